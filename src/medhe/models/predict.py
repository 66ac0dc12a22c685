"""Plaintext prediction: the reference every encrypted result is compared against.

``model_inputs`` turns raw images into exactly what the server network receives (the card's preprocessing, then
the public client stage when there is one), so the plain and the encrypted paths start from the same tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medhe.errors import DataError
from medhe.models.layers import activation_sites


def _forward(model: nn.Module, x: np.ndarray, batch_size: int, record: bool = False) -> np.ndarray:
    """Eval-mode outputs in batches, full output shape kept.

    Activation range recording is paused unless ``record``: evaluating on val/test images must not widen the
    ranges the encrypted backends size their parameters from. Train/eval mode and recording flags are restored.
    """
    x = np.asarray(x, dtype=np.float32)
    was_training = model.training
    sites = activation_sites(model).values()
    was_recording = [site.recording for site in sites]
    model.eval()
    for site in sites:
        site.recording = record
    outs = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                outs.append(model(torch.from_numpy(x[start:start + batch_size])).numpy())
    finally:
        model.train(was_training)
        for site, flag in zip(sites, was_recording):
            site.recording = flag
    return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)


def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256, record: bool = False) -> np.ndarray:
    """Eval-mode logits of ``model`` on a float (N, C, H, W) array, as float64 (N, K).

    ``record=True`` lets the activations record their input ranges (used once, over the training set)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise DataError(f"expected a batch of inputs (N, ...), got shape {x.shape}")
    if len(x) == 0:
        raise DataError("no images to predict: the split or limit selected nothing")
    out = _forward(model, x, batch_size, record).astype(np.float64)
    return out.reshape(len(x), -1)


def model_inputs(artifact: Any, images: np.ndarray) -> np.ndarray:
    """Raw uint8 images -> float32 input of the server network (preprocess, then the client stage if any)."""
    x = artifact.preprocess().batch(images)
    if artifact.client_model is not None:
        x = _forward(artifact.client_model, x, 256).astype(np.float32)
    return x


def evaluate_plain(artifact: Any, dataset: str | None = None, split: str = "test", limit: int | None = None,
                   data_dir: str | None = None) -> dict[str, Any]:
    """The shared JSON report of plaintext inference: ``{"dataset","model","scheme":"plain","split","n","plain"}``
    plus ``clinical`` (``{"plain": ...}``, binary and multi-label tasks: ``medhe.models.clinical``)."""
    from medhe.data import dataset_info, load_dataset
    from medhe.models.metrics import compute_metrics

    card_ds = artifact.card.get("dataset") or {}
    name = dataset or card_ds.get("name") or card_ds.get("path")
    if not name:
        raise DataError(f"model {artifact.name!r} records no dataset: pass the dataset to evaluate on")
    size = card_ds.get("size") if dataset_info(name, data_dir=data_dir).get("kind") == "medmnist" else None
    ds = load_dataset(name, split=split, size=size, data_dir=data_dir)
    images, labels = ds.images, ds.labels
    if limit is not None:
        if limit < 1:
            raise DataError("limit must be at least 1")
        images, labels = images[:limit], labels[:limit]
    logits = predict_logits(artifact.model, model_inputs(artifact, images))
    if logits.shape[1] != len(artifact.labels):
        raise DataError(f"model {artifact.name!r} gives {logits.shape[1]} outputs for {len(artifact.labels)} labels")
    from medhe.models.clinical import clinical_metrics, positive_class

    positive: tuple[int | None, str | None] = (None, None)
    if artifact.task == "binary-class" and len(artifact.labels) == 2:
        positive = positive_class(artifact.labels, artifact.card.get("positive_label"))
    clinical = clinical_metrics(artifact.task, labels, logits, artifact.labels, *positive)
    return {"dataset": str(ds.name), "model": artifact.name, "scheme": "plain", "split": split,
            "n": int(len(labels)), "plain": compute_metrics(artifact.task, labels, logits),
            **({"clinical": {"plain": clinical}} if clinical is not None else {})}
