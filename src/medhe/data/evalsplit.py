"""The labelled split a model is scored on, checked against the model's own label layout.

Below the CLI so the benchmarks and measurements in ``he/`` load their images the way ``medhe evaluate`` does
without importing the CLI (imports flow data -> models -> he -> ... -> cli). The artifact is duck-typed (``name``,
``labels``, ``card``) so the data layer imports no model code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medhe.data.loader import dataset_info, load_dataset
from medhe.errors import DataError


def load_eval_data(artifact: Any, dataset: str | None, split: str, limit: int | None,
                   data_dir: str | None, sample: int | None = None) -> tuple[str, Any]:
    """The dataset split to evaluate, checked against the model's label layout."""
    card_ds = artifact.card.get("dataset") or {}
    name = dataset or card_ds.get("name") or card_ds.get("path")
    if not name:
        raise DataError(f"model {artifact.name!r} records no dataset: pass --dataset FLAG|FOLDER")
    info = dataset_info(name, data_dir=data_dir)
    size = card_ds.get("size") if info.get("kind") == "medmnist" else None
    ds = load_dataset(name, split=split, size=size, data_dir=data_dir)
    if [str(n).lower() for n in ds.label_names] != [str(n).lower() for n in artifact.labels]:
        raise DataError(f"dataset {name!r} has labels {ds.label_names} but model {artifact.name!r} predicts "
                        f"{artifact.labels}: evaluate on a dataset with the model's label layout")
    if limit is not None:
        if limit < 1:
            raise DataError("--limit must be at least 1")
        ds.images, ds.labels = ds.images[:limit], ds.labels[:limit]
        ds.paths = None if ds.paths is None else ds.paths[:limit]
    if sample is not None:
        if sample < 1:
            raise DataError("--sample must be at least 1")
        keep = np.unique(np.linspace(0, len(ds.labels) - 1, min(sample, len(ds.labels))).round().astype(int))
        ds.images, ds.labels = ds.images[keep], ds.labels[keep]
        ds.paths = None if ds.paths is None else [ds.paths[i] for i in keep]
    return str(name), ds
