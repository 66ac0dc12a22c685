"""ACC / AUC / F1 from logits with MedMNIST's conventions, so plain and encrypted results compare like for like.

Binary: softmax, AUC on the probability of class 1, ACC and F1 on the argmax. Multi-class and ordinal: one-vs-rest
macro AUC on softmax probabilities, ACC, macro F1. Multi-label: sigmoid, macro AUC over the labels that have both
classes present, ACC = mean per-label accuracy at 0.5, macro F1. A metric that is undefined (one class only) is None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medhe.errors import DataError

TASKS = ("binary-class", "multi-class", "multi-label", "ordinal-regression")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def _logits(logits: Any) -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    return arr.reshape(-1, 1) if arr.ndim == 1 else arr


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def probabilities(task: str, logits: Any) -> np.ndarray:
    """Per-class (softmax) or per-label (sigmoid) probabilities, shape (N, K)."""
    _check_task(task)
    z = _logits(logits)
    return _sigmoid(z) if task == "multi-label" else _softmax(z)


def predictions(task: str, logits: Any) -> np.ndarray:
    """Class index (N,) for single-label tasks; 0/1 matrix (N, L) at sigmoid 0.5 (logit 0) for multi-label."""
    _check_task(task)
    z = _logits(logits)
    return (z > 0).astype(np.int64) if task == "multi-label" else z.argmax(axis=1).astype(np.int64)


def compute_metrics(task: str, labels: Any, logits: Any) -> dict[str, float | None]:
    """``{"acc", "auc", "f1"}`` of ``logits`` (N, K) against ``labels`` ((N,) / (N, 1) indices, or (N, L) 0/1)."""
    _check_task(task)
    z = _logits(logits)
    y = np.asarray(labels).astype(np.int64)
    if len(y) != len(z):
        raise DataError(f"{len(y)} labels but {len(z)} predictions: evaluate the same images you predicted")
    if len(y) == 0:
        raise DataError("no images to score: the split or --limit selected nothing")
    if task == "multi-label":
        return _multilabel(y.reshape(len(y), -1), z)
    y = y.reshape(-1)
    prob = _softmax(z)
    pred = prob.argmax(axis=1)
    acc = float(accuracy_score(y, pred))
    if task == "binary-class" and z.shape[1] == 2:  # F1 of the positive class (label 1)
        f1 = float(f1_score(y, pred, average="binary", zero_division=0))
    else:
        f1 = float(f1_score(y, pred, average="macro", labels=np.arange(z.shape[1]), zero_division=0))
    return {"acc": acc, "auc": _auc_single_label(task, y, prob), "f1": f1}


def _auc_single_label(task: str, y: np.ndarray, prob: np.ndarray) -> float | None:
    present = np.unique(y)
    if len(present) < 2:
        return None
    if prob.shape[1] == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    if len(present) < prob.shape[1]:
        # sklearn's multi-class AUC needs every class present; average one-vs-rest over the classes that are.
        scores = [roc_auc_score(y == k, prob[:, k]) for k in present]
        return float(np.mean(scores))
    return float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))


def _multilabel(y: np.ndarray, z: np.ndarray) -> dict[str, float | None]:
    if y.shape != z.shape:
        raise DataError(f"labels have shape {y.shape} but logits {z.shape}: the model and dataset label sets differ")
    prob = _sigmoid(z)
    pred = (z > 0).astype(np.int64)
    both = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    auc = float(np.mean([roc_auc_score(y[:, k], prob[:, k]) for k in both])) if both else None
    acc = float(np.mean(pred == y))
    f1 = float(f1_score(y, pred, average="macro", zero_division=0))
    return {"acc": acc, "auc": auc, "f1": f1}
