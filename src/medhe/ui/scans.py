"""Scans dropped on the page: decoded with ``medhe.data.read_image`` and kept in this process's memory only."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from medhe.data import read_image
from medhe.errors import DataError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DECODING = threading.Lock()


def decode(name: str, content: bytes) -> np.ndarray:
    """Bytes of a PNG/JPEG/DICOM file -> uint8 image, with errors that name the user's file, not a temp path.

    ``read_image`` reads paths (DICOM needs a file), so the bytes go to a private temporary folder for the
    moment of decoding and are removed at once. One decode at a time: each may take ``MAX_PIXELS`` pixels."""
    if not content:
        raise DataError(f"{name} is empty: choose a PNG, JPEG or DICOM file")
    with _DECODING:
        folder = tempfile.mkdtemp(prefix="medhe-ui-")  # 0700
        path = Path(folder) / (_SAFE.sub("_", Path(name).name)[-100:] or "scan")
        try:
            path.write_bytes(content)
            return read_image(path)
        except DataError as exc:
            raise DataError(str(exc).replace(str(path), name)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)


#: decoded scans the page keeps, in bytes of pixels: the page process holds the secret key, so its memory is
#: bounded by design (this store + two uploads in flight of at most MAX_UPLOAD + one decode; docs/ui.md).
STORE_BYTES = 512 << 20


class ScanStore:
    """id -> (file name, image); the oldest scans are dropped beyond ``limit`` scans or ``max_bytes`` of pixels."""

    def __init__(self, limit: int = 64, max_bytes: int = STORE_BYTES):
        self.limit = limit
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, name: str, image: np.ndarray) -> str:
        if image.nbytes > self.max_bytes:  # read_image's pixel limit keeps this from happening at the default
            raise DataError(f"{name} needs {-(-image.nbytes >> 20)} MB decoded, more than the page keeps for all "
                            f"its scans ({self.max_bytes >> 20} MB); export it at a smaller size")
        scan_id = uuid.uuid4().hex[:12]
        with self.lock:
            self.items[scan_id] = (name, image)
            self.bytes += image.nbytes
            while len(self.items) > self.limit or self.bytes > self.max_bytes:  # oldest first
                _, (_, dropped) = self.items.popitem(last=False)
                self.bytes -= dropped.nbytes
        return scan_id

    def get(self, scan_id: str) -> tuple[str, np.ndarray]:
        try:
            return self.items[scan_id]
        except KeyError:
            raise DataError("this scan is no longer held by the page (too many scans, or medhe ui restarted); "
                            "add it again") from None


def display_name(raw: str | None) -> str:
    """The file name the browser sent (URL-encoded, any path stripped), for messages and results."""
    name = os.path.basename(unquote(raw or "").replace("\\", "/")).strip()
    return name[:200] or "scan"
