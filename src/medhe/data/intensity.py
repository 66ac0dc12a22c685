"""One intensity rule for every image file: stored values -> the 0..255 grey levels a model sees.

The same scan must give the same model input whether it arrives as DICOM or PNG. So grey levels never depend on an
image's own min..max (a stretch would make a dim scan and a bright one look alike, and a DICOM differ from its PNG
export by dozens of grey levels). The rule, in order:

1. a DICOM VOI LUT (its output range, from the LUT descriptor, maps onto 0..255), else
2. a DICOM window (WindowCenter/WindowWidth, PS3.3 C.11.2.1.2), else
3. the declared range of stored values maps linearly onto 0..255: for a DICOM, 0..2^BitsStored - 1 (signed:
   -2^(BitsStored-1)..2^(BitsStored-1) - 1) through its modality LUT; for PNG/TIFF, 0..255 (unchanged) or
   0..65535 for 16-bit files. So 8-bit pixels are identical in DICOM and PNG.

MONOCHROME1 is inverted afterwards. Only files without a declared range (floating point, 32-bit integers beyond
16 bits, ``.npy`` arrays that are not uint8) are stretched from their min..max, as the only mapping there is.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stored_range_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map the declared value range ``lo..hi`` linearly onto 0..255 (values outside are clipped), rounding to
    nearest: 8-bit values in 0..255 come back unchanged, 16-bit ones are divided by 257."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi <= lo:
        return np.zeros(np.shape(values), dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear windowing (PS3.3 C.11.2.1.2) straight to 0..255."""
    width = max(width, 1.0)
    lo = center - 0.5 - (width - 1) / 2
    scaled = (values - lo) / max(width - 1, 1e-9)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def first(value: Any) -> float:
    """WindowCenter/Width may hold several windows; the first is the default one."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def stored_range(ds: Any) -> tuple[int, int]:
    """The values a DICOM's pixels can hold, from BitsStored and PixelRepresentation (1 = two's complement)."""
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def dicom_to_uint8(arr: np.ndarray, ds: Any) -> np.ndarray:
    """One grey frame of stored DICOM values -> uint8 by the rule above (modality LUT, VOI LUT or window, else the
    stored range; MONOCHROME1 inverted)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
        out = stored_range_to_uint8(np.asarray(apply_voi_lut(values, ds), dtype=np.float64), 0, (1 << bits) - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = window(values, first(ds.WindowCenter), first(ds.WindowWidth))
    else:
        lo, hi = stored_range(ds)
        ends = np.asarray(apply_modality_lut(np.array([lo, hi]), ds), dtype=np.float64)
        out = stored_range_to_uint8(values, float(ends.min()), float(ends.max()))
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are white
    return out
