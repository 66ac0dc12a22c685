"""Batch augmentation for grayscale medical images, in torch so that it costs little next to the training step.

Small random affine warps (rotation, translation, scale) model patient positioning; brightness/contrast jitter
models exposure and scanner differences. No flips by default: anatomy is not left-right symmetric (the heart).
Works on preprocessed (normalised) batches; the border is replicated so warps never invent black frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


def affine_warp(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, flip: torch.Tensor,
                shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """Rotate by ``angle`` (radians), zoom, mirror where ``flip`` is -1 and shift (in grid units, the side is 2)
    each image of a (N, C, H, W) batch; per-image (N,) parameters, computed in their own dtype. The border is
    replicated so a warp never invents a black frame. Shared by training augmentation and test-time views."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(x.shape[0], 2, 3, dtype=angle.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class Augment:
    """Augmentation strengths; ``Augment.off()`` is the identity."""

    rotate_deg: float = 10.0
    translate: float = 0.08  # fraction of the image side
    scale: float = 0.10  # zoom in [1 - scale, 1 + scale]
    brightness: float = 0.10  # additive, in units of the normalised intensity range
    contrast: float = 0.15  # multiplicative, in [1 - contrast, 1 + contrast]
    hflip: bool = False

    @classmethod
    def off(cls) -> "Augment":
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, False)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return any((self.rotate_deg, self.translate, self.scale, self.brightness, self.contrast, self.hflip))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a (N, C, H, W) float batch; each image draws its own parameters from ``generator``."""
        if not self.enabled or x.shape[0] == 0:
            return x
        n = x.shape[0]

        def uniform(scale: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) * 2 - 1) * scale

        if self.rotate_deg or self.translate or self.scale or self.hflip:
            angle = uniform(math.radians(self.rotate_deg))
            zoom = 1 + uniform(self.scale)
            flip = torch.ones(n)
            if self.hflip:
                flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
            x = affine_warp(x, angle, zoom, flip, uniform(2 * self.translate), uniform(2 * self.translate))
        if self.contrast or self.brightness:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            gain = (1 + uniform(self.contrast)).view(n, 1, 1, 1)
            shift = uniform(self.brightness * 2).view(n, 1, 1, 1)  # normalised range spans 2 (mean 0.5, std 0.5)
            x = (x - mean) * gain + mean + shift
        return x
