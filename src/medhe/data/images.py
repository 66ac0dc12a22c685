"""Read one medical image file (PNG, JPEG, DICOM, .npy) into the uint8 array every other medhe step expects.

DICOM pixel values are not display values: the modality LUT (rescale slope/intercept), the VOI LUT or window and
MONOCHROME1 inversion must be applied first, otherwise a model sees an image nobody trained it on.

One intensity rule for every format, so that the same scan gives the model the same input whatever file it came
in (``intensity.py`` holds it): a VOI LUT or window when the DICOM has one, otherwise the file's declared range of
stored values mapped linearly onto 0..255 (8-bit pixels unchanged, 16-bit divided by 257, a 12-bit DICOM by
4095/255); never a stretch of the image's own min..max, which would make the input depend on its content.

Decoding is bounded: an image of more than ``MAX_PIXELS`` pixels is refused from its header, before any pixel is
decoded (a 400 KB PNG can declare 20000x20000 pixels, 400 MB once decoded).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .intensity import dicom_to_uint8, stored_range, stored_range_to_uint8

#: the most pixels (width x height x frames) medhe decodes from one file: 40 megapixels is twice the largest
#: digital mammogram or flat-panel radiograph; a bigger file is a mistake (a whole-slide image, a mosaic) or an
#: attack on the memory of the process that holds the secret key.
MAX_PIXELS = 40_000_000

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


def too_large(path: Path, pixels: int, what: str = "") -> DataError:
    """The one line for an image over ``MAX_PIXELS`` (``what``: its size in words, when known)."""
    size = f"it is {what} ({pixels / 1e6:.0f} megapixels)" if what else f"it declares {pixels / 1e6:.0f} megapixels"
    return DataError(f"cannot read image {path}: {size}, more than the {MAX_PIXELS // 1_000_000} megapixels medhe "
                     "decodes; export the scan at a smaller size")


def _read_pil(path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice its limit raises) for huge images: both become one clear line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                pixels = width * height  # load() decodes the first frame only
                if pixels > MAX_PIXELS:
                    raise too_large(path, pixels, f"{width}x{height} pixels")
                img.load()
                arr = _pil_to_uint8(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = int(found.group(1)) if found else MAX_PIXELS + 1
        raise too_large(path, pixels) from None
    except Image.UnidentifiedImageError:
        raise DataError(
            f"cannot read image {path}: unknown format (use PNG, JPEG, DICOM .dcm or .npy)"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: file is truncated or corrupted ({err})") from None
    return arr


def _pil_to_uint8(img: Image.Image) -> np.ndarray:
    """A decoded PIL image -> uint8 grey or RGB, by the intensity rule: 8-bit as is, 16-bit by its range."""
    mode = img.mode
    if mode in ("1", "L", "RGB"):
        return np.array(img.convert("L") if mode == "1" else img)
    if mode.startswith("I;16"):  # 16-bit grey (PNG, TIFF): 0..65535 -> 0..255
        return stored_range_to_uint8(np.array(img, dtype=np.float64), 0, 65535)
    if mode == "I":  # 32-bit integer: 16-bit files opened this way keep their 0..65535 range
        values = np.array(img, dtype=np.float64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return stored_range_to_uint8(values, 0, 65535)
        return scale_to_uint8(values)  # no declared range to map from
    if mode == "F":  # floating point has no declared range either
        return scale_to_uint8(np.array(img, dtype=np.float64))
    if mode in ("LA", "La"):
        return np.array(img.convert("L"))
    return np.array(img.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ...


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")  # the header first: nothing read yet
        pixels = arr.size // (min(arr.shape[0], arr.shape[-1]) if arr.ndim == 3 else 1)  # (H, W, C) or (C, H, W)
        if pixels > MAX_PIXELS:
            raise too_large(path, pixels, f"an array of {'x'.join(map(str, arr.shape))}")
        arr = np.array(arr)
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
    from pydicom.pixels import pixel_array

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DataError(f"cannot read image {path}: not a DICOM file") from None
    except Exception as err:  # pydicom raises many types on truncated files
        raise DataError(f"cannot read image {path}: DICOM file is truncated or corrupted ({err})") from None
    if "PixelData" not in ds:
        raise DataError(f"cannot read image {path}: DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"cannot read image {path}: DICOM file has no valid Rows/Columns") from None
    if rows * cols > MAX_PIXELS:  # from the header, before any pixel is decoded
        raise too_large(path, rows * cols, f"{cols}x{rows} pixels")
    try:
        # multi-frame: medhe classifies one 2D image, the first frame, and decodes only that one
        arr = pixel_array(ds, index=0) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ds.pixel_array
    except Exception as err:
        raise DataError(
            f"cannot decode DICOM pixel data in {path} ({err}); compressed files need "
            "`pip install pylibjpeg pylibjpeg-libjpeg` or `pip install python-gdcm`"
        ) from None
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:  # colour (pydicom already converted YBR to RGB)
        return arr if arr.dtype == np.uint8 else stored_range_to_uint8(arr, *stored_range(ds))
    return dicom_to_uint8(arr, ds)


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
