"""Flag a scan that looks unlike what a model was trained on, before anyone trusts its encrypted diagnosis.

A model answers every input with a confident-looking label, and under encryption nobody on the server can notice
that the input was a photo, a blank frame or a wrongly windowed DICOM. These checks run on the client, on the same
uint8 image and ``Preprocess`` the model uses. ``medhe predict`` and the page refuse a flagged image by default
(``--allow-unusual`` / the page's "diagnose unusual scans anyway" diagnose it, marked unreliable). They need
nothing but the public preprocessing record, so the page (``medhe ui``) and the CLI share them. Real scans of the
shipped models' test splits are not flagged (at most 1 in 400; ``tests/test_guard.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import convert_channels, resize
from .preprocess import Preprocess

#: colour images whose channels differ by more than this (mean absolute difference, 0..255) are "really colour".
COLOUR_SPREAD = 8.0
#: below this standard deviation of [0, 1] intensities an image is practically uniform (blank, over-exposed).
MIN_CONTRAST = 0.04
#: share of pixels at the ends of the range (<= 2 or >= 253) above which an image is a drawing or a mask; real
#: chest X-rays with wide black borders reach 0.50 (4 of the 810 COVID-19 Radiography scans exceed 0.4, none of
#: 1,722 checked exceeds 0.51), and since issue 32 a flagged scan is refused by default, so the bar sits above them.
MAX_SATURATED = 0.6
#: a side longer than this times the other side is squeezed visibly when the model has no centre crop.
MAX_ASPECT = 1.25
#: a shorter side below this share of the model's input is enlarged past what training did: covid-cxr-ckks
#: learned from 224-pixel scans enlarged to 256 (0.875), so a 224-pixel scan is usual there, a 20-pixel one for a
#: 28-pixel model (0.71) is not.
MIN_SIDE = 0.75


@dataclass(frozen=True)
class ImageStats:
    """What the checks look at, also shown to the user: size, channels and intensity statistics in [0, 1]."""

    width: int
    height: int
    channels: int
    mean: float
    std: float
    saturated: float  # share of pixels at the extremes, measured as the model sees the image

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "channels": self.channels,
                "mean": round(self.mean, 4), "std": round(self.std, 4), "saturated": round(self.saturated, 4)}


def image_stats(image: np.ndarray, pre: Preprocess) -> ImageStats:
    """Statistics of ``image`` as the model will see it (its channels, crop and size, before normalisation)."""
    image = np.asarray(image)
    seen = convert_channels(image, pre.channels, batch=False)
    if pre.crop == "center":
        from .images import center_crop

        seen = center_crop(seen, color=seen.ndim == 3)
    seen = resize(np.ascontiguousarray(seen), pre.size)
    values = seen.astype(np.float64) / 255.0
    return ImageStats(width=int(image.shape[1]), height=int(image.shape[0]), channels=1 if image.ndim == 2 else 3,
                      mean=float(values.mean()), std=float(values.std()),
                      saturated=float(((seen <= 2) | (seen >= 253)).mean()))


def check_image(image: np.ndarray, pre: Preprocess) -> list[str]:
    """One sentence per reason this image may be unlike the model's training data; empty when none."""
    image = np.asarray(image)
    stats = image_stats(image, pre)
    warnings = []
    if min(stats.width, stats.height) < MIN_SIDE * pre.size:
        warnings.append(f"the image is {stats.width}x{stats.height} pixels, smaller than the model's "
                        f"{pre.size}x{pre.size} input: it will be enlarged and lacks the detail the model was "
                        "trained on")
    if pre.crop is None and max(stats.width, stats.height) > MAX_ASPECT * min(stats.width, stats.height):
        warnings.append(f"the image is {stats.width}x{stats.height} pixels and the model takes square images "
                        "without cropping: it will be squeezed; crop it to the region of interest first")
    if image.ndim == 3 and pre.channels == 1:
        if colour_spread(image) > COLOUR_SPREAD:
            warnings.append("the image is in colour but the model was trained on greyscale scans: is this a "
                            "photograph rather than a scan?")
    if stats.std < MIN_CONTRAST:
        warnings.append(f"the image is almost uniform (contrast {stats.std:.3f}): blank, over-exposed or wrongly "
                        "windowed")
    elif stats.saturated > MAX_SATURATED:
        warnings.append(f"{stats.saturated:.0%} of the pixels are pure black or white: this looks like a drawing, "
                        "a mask or a wrongly windowed image rather than a scan")
    return warnings


def colour_spread(image: np.ndarray, rows: int = 512) -> float:
    """Mean absolute difference between neighbouring channels, in blocks of rows (a 36-megapixel photo would
    need 400 MB of int16 temporaries at once)."""
    total = 0.0
    for top in range(0, image.shape[0], rows):
        block = image[top:top + rows].astype(np.int16)
        total += float(np.abs(np.diff(block, axis=-1)).sum())
    return total / max(1, image.shape[0] * image.shape[1] * (image.shape[2] - 1))


def refusal(name: str, warnings: list[str], override: str) -> str:
    """The one line that refuses a flagged image by default; ``override`` says how to diagnose it anyway."""
    more = f" and {len(warnings) - 1} more reason{'s' if len(warnings) > 2 else ''}" if len(warnings) > 1 else ""
    return (f"{name} looks unlike the model's training data ({warnings[0]}{more}); nothing was sent: check the "
            f"file, or {override} to diagnose it anyway (its result is then marked unreliable)")
