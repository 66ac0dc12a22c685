"""The metrics a clinician reads, each with a bootstrap 95 % interval: one function, ``clinical_metrics``.

ACC/AUC/F1 (``medhe.models.metrics``) compare plain and encrypted runs; a clinician also needs to know what the
model's decision means. Binary tasks: the threshold it decides at, sensitivity and specificity there, PPV, NPV and
the confusion matrix, with "positive" the disease finding (``positive_class``). Multi-label tasks: P1's set (Kim et
al., MICCAI 2025): subset accuracy, micro/macro/weighted AUC and F1, and per-label AUC and F1.

Intervals: images resampled with replacement (``medhe.stats.bootstrap_counts``, fixed seed), percentile interval.
Every metric of a resample is the same definition as its point estimate with the draw counts as weights, so it is
computed once per resample on data sorted once. A label with one class only in a resample has no AUC there and is
skipped for that resample (as ``compute_metrics`` skips it on the whole split); a metric undefined on the whole
split is ``None`` with a ``None`` interval.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from medhe.errors import DataError
from medhe.models.metrics import predictions, probabilities
from medhe.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_counts, percentile_interval

_NORMAL = re.compile(r"(?<![a-z])normal", re.IGNORECASE)  # "Normal", "normal, benign"; not "abnormal"


def positive_class(label_names: Sequence[Any], positive_label: str | None = None) -> tuple[int, str]:
    """``(index, rule)`` of the class that counts as positive (the finding) in a binary task.

    The card's ``positive_label`` when it names one (rule ``"card"``); else the class that is not the one named
    normal (``"normal-label"``: covid-cxr's ["COVID", "Normal"] -> COVID, breastmnist's "normal, benign" ->
    malignant); else class 1 (``"index-1"``, MedMNIST's convention).
    """
    names = [str(n) for n in label_names]
    if positive_label is not None:
        match = [i for i, n in enumerate(names) if n.lower() == str(positive_label).lower()]
        if not match:
            raise DataError(f"the model card's positive_label {positive_label!r} is not one of its labels {names}: "
                            "fix positive_label in card.json")
        return match[0], "card"
    normal = [i for i, n in enumerate(names) if _NORMAL.search(n)]
    if len(names) == 2 and len(normal) == 1:
        return 1 - normal[0], "normal-label"
    return 1, "index-1"


def clinical_metrics(task: str, labels: Any, logits: Any, label_names: Sequence[Any] | None = None,
                     positive: int | None = None, positive_rule: str | None = None,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any] | None:
    """The clinician's block for ``logits`` (N, K) against ``labels``; ``None`` for tasks it does not cover
    (multi-class, ordinal: their confusion has no single positive). ``positive``: class index of the finding
    (default ``positive_class(label_names)``)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z.reshape(-1, 1) if z.ndim == 1 else z
    y = np.asarray(labels).astype(np.int64)
    if len(y) != len(z) or not len(z):
        raise DataError(f"{len(y)} labels but {len(z)} predictions: score the same, non-empty, set of images")
    y = y.reshape(len(z), -1)
    names = [str(n) for n in label_names] if label_names is not None else [str(k) for k in range(z.shape[1])]
    boot = {"resamples": int(resamples), "seed": int(seed), "interval": "percentile", "level": 0.95,
            "unit": "image"}
    if task == "multi-label":
        return {"kind": "multi-label", "n": int(len(z)), **_multilabel(y, z, names, resamples, seed),
                "bootstrap": boot}
    if task == "binary-class" and z.shape[1] == 2:
        if positive is None:
            positive, positive_rule = positive_class(names)
        return {"kind": "binary", "n": int(len(z)), **_binary(y[:, 0], z, names, int(positive), positive_rule,
                                                              resamples, seed), "bootstrap": boot}
    return None


# -- one metric over many weightings ---------------------------------------------------------------------------------
def _entry(point: np.ndarray, boot: list[np.ndarray], digits: int = 6) -> dict[str, Any]:
    """``{"value", "ci95", "resamples"}`` of one metric: its point estimate (weights 1) and its resamples."""
    value = float(point[0])
    values = np.concatenate(boot) if boot else np.zeros(0)
    used = int(np.isfinite(values).sum())
    if not np.isfinite(value):
        return {"value": None, "ci95": None, "resamples": 0}
    ci = percentile_interval(values)
    return {"value": round(value, digits), "ci95": None if ci is None else [round(c, digits) for c in ci],
            "resamples": used}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


class _Auc:
    """ROC AUC under item weights (ties count one half, as scikit-learn's), with the scores sorted once."""

    def __init__(self, y: np.ndarray, score: np.ndarray):
        self.order = np.argsort(score, kind="mergesort")
        s = score[self.order]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first item of each group of equal scores
        self.pos = y[self.order].astype(np.float64)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        ws = w[:, self.order]
        pos = np.add.reduceat(ws * self.pos, self.starts, axis=1)
        neg = np.add.reduceat(ws * (1.0 - self.pos), self.starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        return _ratio((pos * (below + 0.5 * neg)).sum(axis=1), n_pos * n_neg)


def _over(n: int, resamples: int, seed: int, chunk: int) -> list[np.ndarray]:
    """The weightings to evaluate: all ones (the point estimate) first, then the bootstrap resamples."""
    return [np.ones((1, n))] + list(bootstrap_counts(n, resamples, seed, chunk))


# -- binary: the clinician's view --------------------------------------------------------------------------------------
def _binary(y: np.ndarray, z: np.ndarray, names: list[str], p: int, rule: str | None, resamples: int,
            seed: int) -> dict[str, Any]:
    if not 0 <= p < 2:
        raise DataError(f"positive class {p} is not 0 or 1: a binary model has two classes")
    truth = (y == p).astype(np.float64)
    pred = (predictions("binary-class", z) == p).astype(np.float64)
    score = probabilities("binary-class", z)[:, p]
    cells = np.stack([truth * pred, truth * (1 - pred), (1 - truth) * pred, (1 - truth) * (1 - pred)], axis=1)
    auc = _Auc(truth, score)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("acc", "auc", "sensitivity", "specificity", "ppv", "npv")}
    for w in _over(len(y), resamples, seed, chunk=256):
        tp, fn, fp, tn = (w @ cells).T
        out["acc"].append((tp + tn) / w.sum(axis=1))
        out["auc"].append(auc(w))
        out["sensitivity"].append(_ratio(tp, tp + fn))
        out["specificity"].append(_ratio(tn, tn + fp))
        out["ppv"].append(_ratio(tp, tp + fp))
        out["npv"].append(_ratio(tn, tn + fn))
    tp, fn, fp, tn = (int(v) for v in cells.sum(axis=0))
    metrics = {k: _entry(v[0], v[1:]) for k, v in out.items()}
    sens, spec = metrics["sensitivity"]["value"], metrics["specificity"]["value"]
    return {
        "positive": {"index": p, "label": names[p], "rule": rule or "given"},
        "negative": {"index": 1 - p, "label": names[1 - p]},
        # the model's decision is the argmax of its softmax, i.e. P(positive) at 0.5; numpy's argmax gives an
        # exact tie to class index 0, hence ">=" when the positive class is 0 and ">" when it is 1
        "threshold": {"probability": 0.5, "score": f"P({names[p]})",
                      "rule": f"{names[p]} when P({names[p]}) {'>=' if p == 0 else '>'} 0.5 (argmax of softmax)"},
        "confusion": {"positive": names[p], "negative": names[1 - p], "tp": tp, "fn": fn, "fp": fp, "tn": tn},
        **metrics,
        "operating_point": {"fpr": None if spec is None else round(1 - spec, 6), "tpr": sens},
    }


# -- multi-label: P1's set ---------------------------------------------------------------------------------------------
def _multilabel(y: np.ndarray, z: np.ndarray, names: list[str], resamples: int, seed: int) -> dict[str, Any]:
    if y.shape != z.shape:
        raise DataError(f"labels have shape {y.shape} but logits {z.shape}: the model and dataset label sets differ")
    n, n_labels = y.shape
    if len(names) != n_labels:
        names = [str(k) for k in range(n_labels)]
    yf = y.astype(np.float64)
    pred = predictions("multi-label", z).astype(np.float64)
    prob = probabilities("multi-label", z)
    aucs = [_Auc(yf[:, k], prob[:, k]) for k in range(n_labels)]
    micro = _Auc(yf.ravel(), prob.ravel())  # every (image, label) pair one item; an image's pairs share its weight
    exact = np.all(pred == yf, axis=1).astype(np.float64)
    tp_m, fp_m, fn_m = yf * pred, (1 - yf) * pred, yf * (1 - pred)
    keys = ("subset_accuracy", "auc_micro", "auc_macro", "auc_weighted", "f1_micro", "f1_macro", "f1_weighted",
            "label_auc", "label_f1")
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    chunk = max(1, min(256, 4_000_000 // max(1, n * n_labels)))  # bound the (k, n * labels) micro-AUC weights
    for w in _over(n, resamples, seed, chunk):
        total = w.sum(axis=1)
        out["subset_accuracy"].append(w @ exact / total)
        support = w @ yf  # positives per label in this resample
        label_auc = np.stack([a(w) for a in aucs], axis=1)  # NaN: one class only -> skipped below
        defined = np.isfinite(label_auc)
        out["auc_macro"].append(_ratio(np.where(defined, label_auc, 0).sum(axis=1), defined.sum(axis=1)))
        out["auc_weighted"].append(_ratio(np.where(defined, label_auc * support, 0).sum(axis=1),
                                          np.where(defined, support, 0).sum(axis=1)))
        out["auc_micro"].append(micro(np.repeat(w, n_labels, axis=1)))
        tp, fp, fn = w @ tp_m, w @ fp_m, w @ fn_m
        label_f1 = _ratio(2 * tp, 2 * tp + fp + fn)  # NaN: no positive and none predicted -> skipped per label
        f1_zero = np.nan_to_num(label_f1)  # scikit-learn's zero_division=0 for the averages (= compute_metrics)
        out["f1_macro"].append(f1_zero.mean(axis=1))
        out["f1_weighted"].append(_ratio((f1_zero * support).sum(axis=1), support.sum(axis=1)))
        out["f1_micro"].append(_ratio(2 * tp.sum(axis=1), (2 * tp + fp + fn).sum(axis=1)))
        out["label_auc"].append(label_auc)
        out["label_f1"].append(label_f1)
    scalar = {k: _entry(out[k][0], out[k][1:]) for k in keys[:7]}
    per_label = [{"label": names[j], "positives": int(y[:, j].sum()),
                  "auc": _entry(out["label_auc"][0][:, j], [b[:, j] for b in out["label_auc"][1:]]),
                  "f1": _entry(out["label_f1"][0][:, j], [b[:, j] for b in out["label_f1"][1:]])}
                 for j in range(n_labels)]
    return {
        "threshold": {"probability": 0.5, "rule": "each label positive when its sigmoid > 0.5 (logit > 0)"},
        "subset_accuracy": scalar["subset_accuracy"],
        "auc": {"micro": scalar["auc_micro"], "macro": scalar["auc_macro"], "weighted": scalar["auc_weighted"]},
        "f1": {"micro": scalar["f1_micro"], "macro": scalar["f1_macro"], "weighted": scalar["f1_weighted"]},
        "per_label": per_label,
    }
