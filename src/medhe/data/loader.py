"""One entry point for every dataset: a MedMNIST flag, a folder path, or a folder name inside the data folder."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..errors import DataError
from .dataset import Dataset
from .folder import KNOWN_FOLDERS, folder_info, is_image_folder, load_folder
from .medmnist import FLAGS, MEDMNIST, SIZES, load_medmnist, resolve_data_dir


def _resolve(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None) -> str | Path:
    """A MedMNIST flag (str) or an image folder (Path); raises a DataError with suggestions otherwise."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text.strip().lower() in MEDMNIST:
        return text.strip().lower()
    path = Path(text).expanduser()
    if path.is_file() and path.name == "labels.csv":
        path = path.parent
    if path.is_dir():
        if is_image_folder(path):
            return path
        raise DataError(f"{path} is a folder without labels.csv: add one (columns: path plus labels)")
    root = resolve_data_dir(data_dir)
    if not path.is_absolute() and (root / path).is_dir():
        return _resolve(root / path, data_dir)
    if os.sep in text or text.startswith((".", "~")):
        raise DataError(f"dataset folder {text} does not exist (check the path)")
    candidates = list(FLAGS) + sorted(set(KNOWN_FOLDERS) | _folders_in(root))
    close = difflib.get_close_matches(text.lower(), candidates, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DataError(
        f"unknown dataset {text!r}: {hint}use a MedMNIST flag ({', '.join(FLAGS)}), a folder with labels.csv, "
        f"or a folder name inside {root} (MEDHE_DATA)"
    )


def _folders_in(root: Path) -> set[str]:
    try:
        return {p.name for p in root.iterdir() if p.is_dir() and is_image_folder(p)}
    except OSError:
        return set()


def load_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load a split ("train", "val", "test" or "all").

    ``size``: MedMNIST resolution (28 when None; 64/128/224 are separate files); for folders, resize every image
    to size x size on load (None keeps the native size). ``channels``: None keeps native, 1 gray, 3 RGB.
    """
    target = _resolve(name_or_path, data_dir)
    if isinstance(target, Path):
        return load_folder(target, split=split, size=size, channels=channels)
    ds = load_medmnist(target, split=split, size=28 if size is None else size, data_dir=data_dir)
    if channels is not None:
        from .images import convert_channels

        if channels not in (1, 3):
            raise DataError(f"channels must be 1, 3 or None, not {channels!r}")
        ds.images = convert_channels(ds.images, channels, batch=True)
    return ds


def dataset_info(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
    """Task, label names, channel count and kind ("medmnist" or "folder") without loading any image."""
    target = _resolve(name_or_path, data_dir)
    if isinstance(target, Path):
        return folder_info(target)
    info = MEDMNIST[target]
    return {
        "name": info.flag,
        "kind": "medmnist",
        "task": info.task,
        "label_names": list(info.label_names),
        "n_channels": info.n_channels,
        "n_samples": dict(zip(("train", "val", "test"), info.n_samples)),
        "sizes": list(SIZES),
    }
