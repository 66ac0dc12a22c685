"""Pictures for the page: the scan as the model sees it, and the ciphertext as the server sees it."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from medhe.data import Preprocess


def data_url(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def model_view(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """The preprocessed input mapped back to 0..255 (undoing only the normalisation): what the model receives."""
    x = pre(image)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(-1, 1, 1)
    pixels = np.clip((x * std + mean) * 255.0, 0, 255).round().astype(np.uint8)
    return pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)


def ciphertext_view(ciphertext: bytes, side: int = 160) -> np.ndarray:
    """The uploaded bytes laid out as a grey image (a stretch from their middle, past the header): to the server
    an encrypted scan is indistinguishable from noise, which this makes visible."""
    need = side * side
    data = np.frombuffer(ciphertext, dtype=np.uint8)
    if len(data) >= need:
        start = (len(data) - need) // 2
        data = data[start:start + need]
    else:  # small ciphertexts (Paillier): repeat to fill the square
        data = np.resize(data, need) if len(data) else np.zeros(need, dtype=np.uint8)
    return data.reshape(side, side).copy()

