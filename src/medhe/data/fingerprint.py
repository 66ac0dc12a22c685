"""SHA-256 fingerprints of the images a model was trained on, recomputable by anyone holding the same data.

Two schemes, named in every card (docs/model-cards.md shows how to recompute both without medhe):

- ``medhe-files/1`` (image folders): the split's image paths as labels.csv writes them, relative to the folder,
  sorted by code point, each followed by ``\\n``, UTF-8 encoded. Only names: a folder's split is fixed by its
  labels.csv, so the names say which images were used without decoding any.
- ``medhe-arrays/1`` (MedMNIST ``.npz``, which has no file names): the split's ``images`` array as uint8 C-order
  bytes, then its ``labels`` as little-endian int64 C-order bytes (shape (N, 1), as medhe loads them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .dataset import Dataset

FILES = "medhe-files/1"
ARRAYS = "medhe-arrays/1"


def hash_names(paths: Iterable[str]) -> str:
    return hashlib.sha256("".join(f"{p}\n" for p in sorted(paths)).encode("utf-8")).hexdigest()


def hash_arrays(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def fingerprint(parts: Iterable[Dataset]) -> tuple[str, str]:
    """(scheme, sha256) of the union of ``parts`` (e.g. train, or train + val), as loaded."""
    parts = list(parts)
    if all(p.paths is not None for p in parts):
        return FILES, hash_names(p for ds in parts for p in ds.paths)
    images = np.concatenate([ds.images for ds in parts]) if len(parts) > 1 else parts[0].images
    labels = np.concatenate([ds.labels for ds in parts]) if len(parts) > 1 else parts[0].labels
    return ARRAYS, hash_arrays(images, labels)


def split_names(folder: str | os.PathLike, split: str) -> list[str]:
    """The image paths of one split of a folder, without decoding any image (the split ``load_folder`` gives)."""
    from .folder import _read_table, split_indices

    table = _read_table(Path(folder))
    if split == "all":
        return list(table.paths)
    idx = split_indices(table.labels, table.groups, stratify=table.task != "multi-label")[split]
    return [table.paths[i] for i in idx]


def split_fingerprint(name: str, splits: Iterable[str], size: int | None = None,
                      data_dir: str | os.PathLike | None = None) -> dict:
    """``{"scheme", "sha256", "n", "sizes"}`` of the union of ``splits`` of a dataset (a MedMNIST flag or a
    folder), plus the size of each of its train/val/test splits. Folders are read by name only."""
    from .loader import _resolve, load_dataset

    splits = list(splits)
    target = _resolve(name, data_dir)
    if isinstance(target, Path):
        per = {s: split_names(target, s) for s in ("train", "val", "test")}
        names = [p for s in splits for p in (per[s] if s in per else split_names(target, s))]
        return {"scheme": FILES, "sha256": hash_names(names), "n": len(names),
                "sizes": {s: len(v) for s, v in per.items()}}
    from .medmnist import MEDMNIST

    parts = [load_dataset(target, split=s, size=size, data_dir=data_dir) for s in splits]
    scheme, digest = fingerprint(parts)
    return {"scheme": scheme, "sha256": digest, "n": int(sum(len(p) for p in parts)),
            "sizes": dict(zip(("train", "val", "test"), MEDMNIST[target].n_samples))}
