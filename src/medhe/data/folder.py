"""Image-folder datasets described by a ``labels.csv`` (and optionally ``dataset.json``).

Splits are computed here, deterministically (seed 0, rows sorted by path so CSV order does not matter): stratified
by class for single-label data, and grouped (e.g. by patient) when a group column exists, because the same patient
in train and test inflates every metric.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import TASKS, Dataset
from .images import convert_channels, read_image, resize, to_rgb
from .medmnist import CHEST_LABELS

FRACTIONS = (0.7, 0.15, 0.15)
SEED = 0
LABELS_CSV = "labels.csv"
DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class FolderSpec:
    """How to read a folder's labels.csv. ``label_columns`` set means multi-label 0/1 columns."""

    task: str | None = None
    label_names: tuple[str, ...] | None = None
    label_columns: tuple[str, ...] | None = None
    group_column: str | None = None
    path_column: str = "path"


KNOWN_FOLDERS: dict[str, FolderSpec] = {
    "covid19_radiography_subset": FolderSpec(task="binary-class", label_names=("COVID", "Normal")),
    "nih_chestxray14_subset": FolderSpec(
        task="multi-label", label_names=CHEST_LABELS, label_columns=CHEST_LABELS, group_column="patient_id"
    ),
}

_JSON_KEYS = {"task", "label_names", "label_columns", "group_column", "path_column"}
_cache: dict[tuple, tuple[np.ndarray, list[str]]] = {}  # (folder, size, csv stat) -> (images, paths)


@dataclass
class _Table:
    spec: FolderSpec
    task: str
    label_names: list[str]
    paths: list[str]  # sorted
    labels: np.ndarray  # int64 (N, 1) or (N, L)
    groups: np.ndarray | None


def is_image_folder(path: Path) -> bool:
    return (path / LABELS_CSV).is_file()


def clear_cache() -> None:
    """Forget decoded folders (they can take hundreds of MB)."""
    _cache.clear()


def _read_table(folder: Path) -> _Table:
    csv_path = folder / LABELS_CSV
    if not csv_path.is_file():
        raise DataError(f"{folder} has no {LABELS_CSV}: an image folder needs one (columns: path plus labels)")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {csv_path}: {err}") from None
    if not rows:
        raise DataError(f"{csv_path} lists no images: add one row per image")
    spec = _spec(folder, header)
    for col in [spec.path_column, *(spec.label_columns or ()), *([spec.group_column] if spec.group_column else [])]:
        if col not in header:
            raise DataError(f"{csv_path} has no {col!r} column (found: {', '.join(header)})")
    rows.sort(key=lambda r: r[spec.path_column])
    paths = [r[spec.path_column] for r in rows]
    if len(set(paths)) != len(paths):
        dup = next(p for i, p in enumerate(paths[1:]) if p == paths[i])
        raise DataError(f"{csv_path} lists {dup!r} twice: each image must appear once")
    groups = np.array([r[spec.group_column] for r in rows]) if spec.group_column else None
    if spec.label_columns:
        labels = _multi_label(csv_path, rows, spec)
        names = list(spec.label_names or spec.label_columns)
        task = spec.task or "multi-label"
    else:
        labels, names = _single_label(csv_path, rows, spec)
        task = spec.task or ("binary-class" if len(names) == 2 else "multi-class")
    if task not in TASKS:
        raise DataError(f"{folder}: task {task!r} is not one of {', '.join(TASKS)} (fix {DATASET_JSON})")
    return _Table(spec, task, names, paths, labels, groups)


def _spec(folder: Path, header: list[str]) -> FolderSpec:
    """Known table by folder name, overridden by dataset.json, completed from the CSV header."""
    spec = KNOWN_FOLDERS.get(folder.name, FolderSpec())
    override: dict = {}
    json_path = folder / DATASET_JSON
    if json_path.is_file():
        try:
            override = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {json_path}: {err}") from None
        if not isinstance(override, dict):
            raise DataError(f"{json_path} must hold a JSON object with keys {', '.join(sorted(_JSON_KEYS))}")
        bad = sorted(set(override) - _JSON_KEYS)
        if bad:
            raise DataError(f"{json_path}: unknown key {bad[0]!r} (allowed: {', '.join(sorted(_JSON_KEYS))})")
        for key in ("label_names", "label_columns"):
            if key in override and override[key] is not None:
                if not isinstance(override[key], list) or not all(isinstance(v, str) for v in override[key]):
                    raise DataError(f"{json_path}: {key!r} must be a list of strings")
                override[key] = tuple(override[key])
        spec = replace(spec, **override)
    if spec.group_column is None and "group_column" not in override and "patient_id" in header:
        spec = replace(spec, group_column="patient_id")
    if spec.label_columns is None and "label_index" not in header:
        raise DataError(
            f"{folder / LABELS_CSV}: cannot find labels: expected a 'label_index' column (single label, optional "
            f"'label' names) or 0/1 label columns named in {DATASET_JSON} as \"label_columns\""
        )
    if spec.label_columns and spec.label_names and len(spec.label_names) != len(spec.label_columns):
        raise DataError(f"{folder}: {len(spec.label_names)} label_names for {len(spec.label_columns)} label_columns")
    return spec


def _multi_label(csv_path: Path, rows: list[dict], spec: FolderSpec) -> np.ndarray:
    cols = spec.label_columns or ()
    labels = np.zeros((len(rows), len(cols)), dtype=np.int64)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            value = (row[col] or "").strip()
            if value not in ("0", "1"):
                raise DataError(
                    f"{csv_path}: {col}={value!r} for {row[spec.path_column]} (multi-label columns hold 0 or 1)"
                )
            labels[i, j] = int(value)
    return labels


def _single_label(csv_path: Path, rows: list[dict], spec: FolderSpec) -> tuple[np.ndarray, list[str]]:
    idx = np.zeros((len(rows), 1), dtype=np.int64)
    seen: dict[int, str] = {}
    for i, row in enumerate(rows):
        try:
            idx[i, 0] = k = int(row["label_index"])
        except (TypeError, ValueError):
            raise DataError(
                f"{csv_path}: label_index={row['label_index']!r} for {row[spec.path_column]} is not an integer"
            ) from None
        if k < 0:
            raise DataError(f"{csv_path}: negative label_index {k} for {row[spec.path_column]}")
        name = (row.get("label") or "").strip()
        if name and seen.setdefault(k, name) != name:
            raise DataError(f"{csv_path}: label_index {k} is both {seen[k]!r} and {name!r}: make them consistent")
    if spec.label_names:
        names = list(spec.label_names)
        if int(idx.max()) >= len(names):
            raise DataError(f"{csv_path}: label_index {int(idx.max())} but only {len(names)} label names")
        for k, name in seen.items():
            if names[k] != name:
                raise DataError(f"{csv_path}: label_index {k} is {name!r} in the CSV but {names[k]!r} expected")
    else:
        names = [seen.get(k, str(k)) for k in range(int(idx.max()) + 1)]
    return idx, names


# -- splits --------------------------------------------------------------------------------------------------------
def split_indices(
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    stratify: bool = True,
    fractions: tuple[float, float, float] = FRACTIONS,
    seed: int = SEED,
) -> dict[str, np.ndarray]:
    """Deterministic train/val/test row indices: grouped when ``groups`` is given, else stratified if asked."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {fractions} must be three non-negative numbers summing to 1")
    n = len(labels)
    n_test = int(n * fractions[2] + 0.5)
    n_val = int(n * fractions[1] + 0.5)
    if groups is not None:
        train, val, test = _group_split(np.asarray(groups), n_val, n_test, seed)
    else:
        y = labels[:, 0] if stratify and labels.ndim == 2 and labels.shape[1] == 1 else None
        rest, test = _cut(np.arange(n), n_test, y, seed)
        train, val = _cut(rest, n_val, y, seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _cut(idx: np.ndarray, n_out: int, y: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if n_out <= 0:
        return idx, idx[:0]
    if n_out >= len(idx):
        return idx[:0], idx
    strat = None
    if y is not None:
        counts = np.unique(y[idx], return_counts=True)[1]
        if counts.min() >= 2 and min(n_out, len(idx) - n_out) >= len(counts):
            strat = y[idx]  # else: a class too small to stratify, fall back to a plain shuffle
    keep, out = train_test_split(idx, test_size=n_out, stratify=strat, random_state=seed)
    return keep, out


def _group_split(groups: np.ndarray, n_val: int, n_test: int, seed: int):
    """Whole groups go to test, then val, until each holds about its share of images; the rest is train."""
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.RandomState(seed).permutation(len(uniq))
    assign = np.zeros(len(uniq), dtype=np.int64)  # 0 train, 1 val, 2 test
    filled = {1: 0, 2: 0}
    target = {1: n_val, 2: n_test}
    part = 2
    for g in order:
        while part in target and filled[part] >= target[part]:
            part -= 1
        if part == 0:
            break
        assign[g] = part
        filled[part] += counts[g]
    rows = assign[inverse]
    return tuple(np.flatnonzero(rows == k) for k in (0, 1, 2))


# -- images ---------------------------------------------------------------------------------------------------------
def _load_images(folder: Path, paths: list[str], size: int | None) -> np.ndarray:
    """Decode every image of the folder once per process (810 PNGs take seconds), optionally resized."""
    st = (folder / LABELS_CSV).stat()
    key = (str(folder.resolve()), size, st.st_mtime_ns, st.st_size)
    hit = _cache.get(key)
    if hit is not None and hit[1] == paths:
        return hit[0]
    out: np.ndarray | None = None
    for i, rel in enumerate(paths):
        img = read_image(folder / rel)
        if size is not None:
            img = resize(img, size)
        if out is None:
            out = np.empty((len(paths),) + img.shape, dtype=np.uint8)
            first = rel
        if img.shape[:2] != out.shape[1:3]:
            raise DataError(
                f"{folder / rel} is {img.shape[1]}x{img.shape[0]} but {first} is {out.shape[2]}x{out.shape[1]}: "
                f"all images of a folder must share a size, or pass size= to resize them on load"
            )
        if img.ndim == 3 and out.ndim == 3:  # first colour image after gray ones: make the stack RGB
            out = to_rgb(out)
        elif img.ndim == 2 and out.ndim == 4:
            img = to_rgb(img)
        out[i] = img
    assert out is not None
    _cache[key] = (out, list(paths))
    return out


# -- public ---------------------------------------------------------------------------------------------------------
def load_folder(
    folder: str | os.PathLike, split: str = "train", size: int | None = None, channels: int | None = None
) -> Dataset:
    """Load one split (or ``"all"``) of an image folder; ``size`` resizes on load, ``channels`` 1/3 converts."""
    folder = Path(folder)
    if split not in ("train", "val", "test", "all"):
        raise DataError(f"unknown split {split!r}: use train, val, test or all")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, not {channels!r}")
    table = _read_table(folder)
    if split == "all":
        idx = np.arange(len(table.paths))
    else:
        single = table.task != "multi-label"
        idx = split_indices(table.labels, table.groups, stratify=single)[split]
    images = _load_images(folder, table.paths, size)[idx]
    images = convert_channels(images, channels, batch=True)
    return Dataset(
        name=folder.name,
        split=split,
        task=table.task,
        label_names=list(table.label_names),
        images=images,
        labels=table.labels[idx],
        groups=None if table.groups is None else table.groups[idx],
        paths=[table.paths[i] for i in idx],
    )


def folder_info(folder: str | os.PathLike) -> dict:
    """Metadata without decoding images (only the first image's header is read for the channel count)."""
    from PIL import Image

    folder = Path(folder)
    table = _read_table(folder)
    first = folder / table.paths[0]
    try:
        with Image.open(first) as img:
            n_channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except Exception:
        img_arr = read_image(first)  # DICOM / .npy, or raises a DataError naming the file
        n_channels = 1 if img_arr.ndim == 2 else 3
    return {
        "name": folder.name,
        "kind": "folder",
        "path": str(folder),
        "task": table.task,
        "label_names": list(table.label_names),
        "n_channels": n_channels,
        "n_images": len(table.paths),
        "group_column": table.spec.group_column,
    }


def audit_mask(ds: Dataset, audit: dict, data_dir: str | os.PathLike | None = None) -> np.ndarray | None:
    """Rows of ``ds`` in a card's audit subgroup (``{"column", "value"}`` of the folder's labels.csv), e.g. the
    adult-only COVID images: a shortcut check reads the metrics there beside the whole split. ``None`` when the
    dataset is no folder or lacks the column."""
    from medhe.data.medmnist import resolve_data_dir

    if ds.paths is None or not audit.get("column"):
        return None
    folder = Path(ds.name) if Path(ds.name).is_dir() else resolve_data_dir(data_dir) / ds.name
    if not (folder / LABELS_CSV).is_file():
        return None
    with open(folder / LABELS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    column = str(audit["column"])
    if not rows or column not in rows[0]:
        return None
    value = {r["path"]: r[column] for r in rows}
    return np.array([value.get(p) == str(audit.get("value")) for p in ds.paths], dtype=bool)
