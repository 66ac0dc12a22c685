"""MedMNIST v2 / MedMNIST+ 2D datasets: one metadata table, checksum-verified local files, optional download.

Checksums and URLs are those of the official ``medmnist`` package (``info.py`` of medmnist 3.0.2, zenodo record
10519652). A file whose MD5 the table does not know is loaded with a warning instead of a made-up checksum.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset

log = logging.getLogger(__name__)

ZENODO_RECORD = "10519652"
SIZES = (28, 64, 128, 224)
NPZ_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MedMNISTInfo:
    flag: str
    task: str
    label_names: tuple[str, ...]
    n_channels: int
    n_samples: tuple[int, int, int]  # train, val, test
    md5: tuple[str | None, str | None, str | None, str | None]  # for SIZES 28, 64, 128, 224

    def filename(self, size: int) -> str:
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def url(self, size: int) -> str:
        return f"https://zenodo.org/records/{ZENODO_RECORD}/files/{self.filename(size)}?download=1"

    def md5_for(self, size: int) -> str | None:
        return self.md5[SIZES.index(size)]


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")
# ChestMNIST uses NIH ChestX-ray14's own names (medmnist abbreviates "pleural"), so a ChestMNIST model and the NIH
# folder dataset share label names.
CHEST_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")

_TABLE = [
    MedMNISTInfo("pathmnist", "multi-class",
                 ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"), 3, (89996, 10004, 7180),
                 ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                  "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    MedMNISTInfo("chestmnist", "multi-label", CHEST_LABELS, 1, (78468, 11219, 22433),
                 ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
                  "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    MedMNISTInfo("dermamnist", "multi-class",
                 ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                  "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                  "vascular lesions"), 3, (7007, 1003, 2005),
                 ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                  "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d")),
    MedMNISTInfo("octmnist", "multi-class",
                 ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"), 1,
                 (97477, 10832, 1000),
                 ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                  "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    MedMNISTInfo("pneumoniamnist", "binary-class", ("normal", "pneumonia"), 1, (4708, 524, 624),
                 ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                  "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    MedMNISTInfo("retinamnist", "ordinal-regression", ("0", "1", "2", "3", "4"), 3, (1080, 120, 400),
                 ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                  "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    MedMNISTInfo("breastmnist", "binary-class", ("malignant", "normal, benign"), 1, (546, 78, 156),
                 ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                  "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    MedMNISTInfo("bloodmnist", "multi-class",
                 ("basophil", "eosinophil", "erythroblast",
                  "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
                  "neutrophil", "platelet"), 3, (11959, 1712, 3421),
                 ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                  "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    MedMNISTInfo("tissuemnist", "multi-class",
                 ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                  "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                  "Thick Ascending Limb"), 1, (165466, 23640, 47280),
                 ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                  "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
    MedMNISTInfo("organamnist", "multi-class", _ORGANS, 1, (34561, 6491, 17778),
                 ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                  "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    MedMNISTInfo("organcmnist", "multi-class", _ORGANS, 1, (12975, 2392, 8216),
                 ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                  "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    MedMNISTInfo("organsmnist", "multi-class", _ORGANS, 1, (13932, 2452, 8827),
                 ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                  "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
]
MEDMNIST: dict[str, MedMNISTInfo] = {info.flag: info for info in _TABLE}
FLAGS = tuple(MEDMNIST)

_md5_cache: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> md5 hex
_warned_unverified: set[str] = set()


def resolve_data_dir(override: str | os.PathLike | None = None) -> Path:
    """Data folder: explicit ``--data-dir`` value > env ``MEDHE_DATA`` > ``~/.medhe/data``."""
    if override not in (None, ""):
        return Path(override).expanduser()
    env = os.environ.get("MEDHE_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".medhe" / "data"


def offline() -> bool:
    return os.environ.get("MEDHE_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def medmnist_info(flag: str) -> MedMNISTInfo:
    """Metadata of a MedMNIST 2D flag; unknown flags get the list of valid ones and the closest match."""
    key = str(flag).strip().lower()
    if key in MEDMNIST:
        return MEDMNIST[key]
    close = difflib.get_close_matches(key, FLAGS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DataError(f"unknown MedMNIST dataset {flag!r}: {hint}valid flags are {', '.join(FLAGS)}")


def file_md5(path: Path) -> str:
    """MD5 of a file, remembered per (path, mtime, size) so repeated loads skip re-hashing large files."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    digest = _md5_cache.get(key)
    if digest is None:
        h = hashlib.md5()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = _md5_cache[key] = h.hexdigest()
    return digest


def _verify(path: Path, expected: str | None) -> None:
    if expected is None:
        if str(path) not in _warned_unverified:
            _warned_unverified.add(str(path))
            log.warning("no known MD5 for %s: loading it without an integrity check", path)
        return
    actual = file_md5(path)
    if actual != expected:
        raise DataError(
            f"{path} is corrupted (MD5 {actual}, expected {expected}); delete it and load again to re-download, "
            f"or replace it with a good copy"
        )


def fetch(flag: str, size: int = 28, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified ``.npz`` for ``flag``/``size``, downloading it when missing and downloads are allowed."""
    info = medmnist_info(flag)
    if size not in SIZES:
        raise DataError(f"MedMNIST size {size!r} does not exist: use one of {', '.join(map(str, SIZES))}")
    folder = resolve_data_dir(data_dir)
    path = folder / info.filename(size)
    if not path.is_file():
        if offline():
            raise DataError(
                f"{path.name} not found in {folder} and downloads are off (MEDHE_OFFLINE=1): put the file there, "
                f"or point MEDHE_DATA (or --data-dir) at the folder that holds it"
            )
        _download(info.url(size), path, info.md5_for(size))
    _verify(path, info.md5_for(size))
    return path


def _download(url: str, path: Path, expected: str | None) -> None:
    """Stream to a temp file in the target folder, check the MD5, then rename: never a half-written dataset file.

    (``medhe.atomic`` takes the whole payload as bytes; a 224px file is gigabytes, so this streams instead.)
    """
    from tqdm import tqdm

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as err:
        raise DataError(
            f"{path.name} not found in {folder} and that folder is not writable ({err.strerror}): set MEDHE_DATA "
            f"or --data-dir to a writable folder"
        ) from None
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=None) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and h.hexdigest() != expected:
            raise DataError(
                f"download of {path.name} is corrupted (MD5 {h.hexdigest()}, expected {expected}); try again later"
            )
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(
            f"{path.name} not found in {folder} and downloading it failed ({reason}): download {url} yourself "
            f"into that folder, or point MEDHE_DATA (or --data-dir) at a folder that holds it"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_medmnist(
    flag: str, split: str = "train", size: int = 28, data_dir: str | os.PathLike | None = None
) -> Dataset:
    """Load one split (or ``"all"``) of a MedMNIST 2D dataset; labels become int64 (N, 1) or (N, 14)."""
    info = medmnist_info(flag)
    if split not in NPZ_SPLITS + ("all",):
        raise DataError(f"unknown split {split!r}: use train, val, test or all")
    path = fetch(info.flag, size, data_dir)
    splits = NPZ_SPLITS if split == "all" else (split,)
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = [npz[f"{s}_images"] for s in splits]
            labels = [npz[f"{s}_labels"] for s in splits]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{path} is unreadable or not a MedMNIST file ({err}); delete it and load again to re-download"
        ) from None
    x = images[0] if len(images) == 1 else np.concatenate(images)
    y = (labels[0] if len(labels) == 1 else np.concatenate(labels)).astype(np.int64)
    if y.ndim == 1:
        y = y[:, None]
    if x.dtype != np.uint8 or len(x) != len(y):
        raise DataError(f"{path} has unexpected contents (images {x.dtype} {x.shape}, labels {y.shape})")
    return Dataset(name=info.flag, split=split, task=info.task, label_names=list(info.label_names),
                   images=x, labels=y)
