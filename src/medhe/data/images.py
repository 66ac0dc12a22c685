"""Read one medical image file (PNG, JPEG, DICOM, .npy) into the uint8 array every other medhe step expects.

DICOM pixel values are not display values: the modality LUT (rescale slope/intercept), the VOI LUT or window and
MONOCHROME1 inversion must be applied first, otherwise a model sees an image nobody trained it on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom", ".npy")
_DICOM_SUFFIXES = (".dcm", ".dicom")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Return the image at ``path`` as uint8 (H, W) grayscale or (H, W, 3) RGB."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image: pass image files (e.g. {path}/*.png)")
    if not path.is_file():
        raise DataError(f"image file not found: {path} (check the path)")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path)
    if suffix in _DICOM_SUFFIXES or _has_dicom_magic(path):
        return _read_dicom(path)
    return _read_pil(path)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err.strerror or err}") from None
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "L", "RGB"):
                arr = np.array(img.convert("L") if mode == "1" else img)
            elif mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = scale_to_uint8(np.array(img, dtype=np.float64))  # 16-bit / float: stretch to 0..255
            elif mode in ("LA", "La"):
                arr = np.array(img.convert("L"))
            else:  # P, RGBA, CMYK, YCbCr, ...
                arr = np.array(img.convert("RGB"))
    except Image.UnidentifiedImageError:
        raise DataError(
            f"cannot read image {path}: unknown format (use PNG, JPEG, DICOM .dcm or .npy)"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: file is truncated or corrupted ({err})") from None
    return arr


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {path}: not a valid .npy array ({err})") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first -> channel-last
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or arr.size == 0:
        raise DataError(f"cannot read image {path}: array shape {arr.shape} is not (H, W) or (H, W, 3)")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"cannot read image {path}: dtype {arr.dtype} is not numeric")
    return scale_to_uint8(arr.astype(np.float64))


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DataError(f"cannot read image {path}: not a DICOM file") from None
    except Exception as err:  # pydicom raises many types on truncated files
        raise DataError(f"cannot read image {path}: DICOM file is truncated or corrupted ({err})") from None
    if "PixelData" not in ds:
        raise DataError(f"cannot read image {path}: DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as err:
        raise DataError(
            f"cannot decode DICOM pixel data in {path} ({err}); compressed files need "
            "`pip install pylibjpeg pylibjpeg-libjpeg` or `pip install python-gdcm`"
        ) from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # multi-frame: medhe classifies one 2D image, the first frame
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:  # colour (pydicom already converted YBR to RGB)
        return arr if arr.dtype == np.uint8 else scale_to_uint8(arr.astype(np.float64))
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        out = scale_to_uint8(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    else:
        out = scale_to_uint8(values)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are white
    return out


def _first(value) -> float:
    """WindowCenter/Width may hold several windows; the first is the default one."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear windowing (PS3.3 C.11.2.1.2) straight to 0..255."""
    width = max(width, 1.0)
    lo = center - 0.5 - (width - 1) / 2
    scaled = (values - lo) / max(width - 1, 1e-9)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch the value range to 0..255 (a constant image becomes all zeros)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_gray(images: np.ndarray) -> np.ndarray:
    """RGB (..., 3) uint8 -> gray (...) with PIL's ITU-R 601 luma weights, so results equal ``convert("L")``."""
    out = np.empty(images.shape[:-1], dtype=np.uint8)
    flat_in = images.reshape(-1, *images.shape[-3:]) if images.ndim >= 3 else images[None]
    flat_out = out.reshape(-1, *out.shape[-2:]) if out.ndim >= 2 else out[None]
    step = 64  # chunks keep the uint32 temporaries small for big folders
    for i in range(0, len(flat_in), step):
        c = flat_in[i : i + step].astype(np.uint32)
        flat_out[i : i + step] = (c[..., 0] * 19595 + c[..., 1] * 38470 + c[..., 2] * 7471 + 0x8000) >> 16
    return out


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Gray (...) uint8 -> (..., 3) by repeating the channel."""
    return np.repeat(images[..., None], 3, axis=-1)


def convert_channels(images: np.ndarray, channels: int | None, *, batch: bool) -> np.ndarray:
    """Convert one image (``batch=False``) or a stack of images to 1 or 3 channels; ``None`` keeps them."""
    if channels is None:
        return images
    is_rgb = images.ndim == (4 if batch else 3)
    if channels == 1:
        return to_gray(images) if is_rgb else images
    if channels == 3:
        return images if is_rgb else to_rgb(images)
    raise DataError(f"channels must be 1, 3 or None, not {channels!r}")


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 (H, W) or (H, W, 3) image: area averaging when shrinking, bicubic when enlarging."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    shrink = h <= image.shape[0] and w <= image.shape[1]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize((w, h), method))


def center_crop(image: np.ndarray, *, color: bool) -> np.ndarray:
    """Crop (..., H, W) or (..., H, W, 3) to the centred square of side min(H, W); works on stacks too."""
    hd = image.ndim - (3 if color else 2)
    h, w = image.shape[hd], image.shape[hd + 1]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    index = [slice(None)] * image.ndim
    index[hd] = slice(top, top + s)
    index[hd + 1] = slice(left, left + s)
    return image[tuple(index)]
