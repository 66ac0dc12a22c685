"""The exact image -> tensor transform a model was trained with; it is stored in the model card so that the client
applies the same transform before encrypting (a mismatch silently ruins encrypted accuracy)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .images import center_crop, convert_channels, resize

_CROPS = (None, "center")


@dataclass
class Preprocess:
    """uint8 image -> float32 (C, size, size): channels, optional centre crop, resize, scale to [0, 1], normalise."""

    channels: int = 1
    size: int = 28
    crop: str | None = None
    mean: float | list[float] = 0.5
    std: float | list[float] = 0.5

    def __post_init__(self) -> None:
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise DataError(f"Preprocess: channels must be 1 or 3, not {self.channels!r}")
        if not isinstance(self.size, (int, np.integer)) or isinstance(self.size, bool) or self.size < 1:
            raise DataError(f"Preprocess: size must be a positive integer, not {self.size!r}")
        self.size = int(self.size)
        if self.crop not in _CROPS:
            raise DataError(f"Preprocess: crop must be None or 'center', not {self.crop!r}")
        self.mean = self._stat("mean", self.mean)
        self.std = self._stat("std", self.std)
        if np.any(np.asarray(self.std) <= 0):
            raise DataError(f"Preprocess: std must be > 0, not {self.std!r}")

    def _stat(self, key: str, value: Any) -> float | list[float]:
        try:
            if isinstance(value, (list, tuple, np.ndarray)):
                value = [float(v) for v in value]
                if len(value) == 1:
                    return value[0]
                if len(value) != self.channels:
                    raise ValueError
                return value
            return float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"Preprocess: {key} must be a number or a list of {self.channels} numbers, not {value!r}"
            ) from None

    # -- transform ------------------------------------------------------------------------------------------------
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One uint8 (H, W) or (H, W, C) image -> float32 (C, size, size)."""
        image = _as_uint8(image)
        if image.ndim not in (2, 3):
            raise DataError(f"Preprocess: expected one (H, W) or (H, W, C) image, got shape {image.shape}")
        return self.batch(image[None])[0]

    def batch(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (N, H, W) / (N, H, W, C) array, or a list of images of any sizes -> float32 (N, C, size, size)."""
        if not isinstance(images, np.ndarray):
            items = [self(img) for img in images]
            if not items:
                return np.zeros((0, self.channels, self.size, self.size), dtype=np.float32)
            return np.stack(items)
        images = _as_uint8(images)
        if images.ndim == 4 and images.shape[-1] in (1, 4):
            images = images[..., 0] if images.shape[-1] == 1 else images[..., :3]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise DataError(f"Preprocess: expected (N, H, W) or (N, H, W, 3) images, got shape {images.shape}")
        x = convert_channels(images, self.channels, batch=True)
        if self.crop == "center":
            x = center_crop(x, color=self.channels == 3)
        if x.shape[1:3] != (self.size, self.size):  # slow path: PIL resize per image
            x = np.stack([resize(img, self.size) for img in x]) if len(x) else x.reshape(
                (0, self.size, self.size) + x.shape[3:])
        x = x.astype(np.float32)
        x = x[:, None] if self.channels == 1 else np.moveaxis(x, -1, 1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        x *= np.float32(1 / 255)
        x -= mean
        x /= std
        return np.ascontiguousarray(x, dtype=np.float32)

    # -- model card -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": self.size, "crop": self.crop, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        if not isinstance(d, dict):
            raise DataError(f"preprocessing must be a JSON object, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(
                f"preprocessing: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})"
            )
        return cls(**d)


def _as_uint8(images: Any) -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise DataError(f"Preprocess expects uint8 images (0..255), got dtype {arr.dtype}; use read_image()")
    return arr
