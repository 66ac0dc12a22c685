"""Calibrated probabilities and conformal prediction sets, computed by the client from decrypted logits.

Why here and not on the server: the server only ever holds ciphertexts, so it cannot calibrate a result; the client
decrypts logits and applies a small public record from the model card. Because the record is applied to logits after
decryption, encrypted and plain inference give the same calibrated output up to the scheme's logit error (and
identical sets unless a probability lies within that error of the set's threshold).

Two steps, both fitted once on the **validation** split (never on test, which stays for measuring them):

- *Temperature scaling* (Guo et al. 2017): divide the logits by one temperature T (multi-label: one per label)
  chosen to minimise the negative log-likelihood. It changes how confident the model sounds, not which class is on
  top, so accuracy, AUC and the decision rule are unchanged.
- *Split-conformal prediction sets*, score "1 - calibrated probability of the true label" (LAC, Sadinle et al.
  2019). With the n sorted validation scores, the threshold for coverage 1 - alpha is the ceil((n + 1)(1 - alpha))-th
  smallest one, and the set holds every label whose probability is at least 1 - threshold. If test images are
  exchangeable with validation images, a set holds the true label with probability >= 1 - alpha (marginally, over
  images, not per image). The record keeps all sorted scores, so a client can form sets at any coverage.

Set sizes for single-label tasks: one label is a diagnosis; two or more mean "uncertain: both/any of these"; and an
**empty set** is possible. It happens when the coverage asked for is lower than the model's accuracy: the
threshold then sits below the confidence of some images' top label, and such an image gets no label at all. An empty
set is shown as uncertain ("uncertain: neither label reaches the set's threshold"), never replaced by the top label,
because replacing it would silently change the guarantee. Multi-label tasks get one set per label from that
label's own scores: {positive}, {negative} or both (uncertain); a per-label set can be empty for the same reason.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from medhe.errors import ArtifactError, DataError
from medhe.models.metrics import TASKS

METHOD = "temperature"
SCORE = "1 - p_true (calibrated)"
DEFAULT_COVERAGE = 0.9
ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)  # search range of the temperature; a fit on the bound is reported, not hidden
DIGITS = 6  # stored scores are rounded: card.json stays small and the thresholds move by < 1e-6


# -- probabilities ----------------------------------------------------------------------------------------------
def _logits(task: str, logits: Any) -> np.ndarray:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    z = np.asarray(logits, dtype=np.float64)
    return z.reshape(1, -1) if z.ndim == 1 else z


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _scaled_probabilities(task: str, z: np.ndarray, temperature: Any) -> np.ndarray:
    t = np.asarray(temperature, dtype=np.float64)
    return _sigmoid(z / t) if task == "multi-label" else _softmax(z / t)


def _labels(task: str, labels: Any, z: np.ndarray) -> np.ndarray:
    y = np.asarray(labels).astype(np.int64)
    if len(y) != len(z):
        raise DataError(f"{len(y)} labels but {len(z)} logits: calibrate on the images you predicted")
    if len(y) == 0:
        raise DataError("no images to calibrate on: the split selected nothing")
    if task == "multi-label":
        y = y.reshape(len(y), -1)
        if y.shape != z.shape:
            raise DataError(f"labels have shape {y.shape} but logits {z.shape}: model and dataset label sets differ")
        return y
    y = y.reshape(-1)
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise DataError(f"labels outside 0..{z.shape[1] - 1}: model and dataset label sets differ")
    return y


# -- expected calibration error ---------------------------------------------------------------------------------
def ece(task: str, labels: Any, probabilities: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins on [0, 1].

    Single-label: the top class's probability against whether it is right (the usual top-label ECE).
    Multi-label: every label probability against that label's 0/1 truth, pooled over all labels (a model that
    says 0.8 should see the finding 80% of the time). Sum over bins of |accuracy - confidence| times bin share.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    p = p.reshape(1, -1) if p.ndim == 1 else p
    y = _labels(task, labels, p)
    if task == "multi-label":
        conf, hit = p.reshape(-1), y.reshape(-1).astype(np.float64)
    else:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # (lo, hi]; 0 goes to the first bin
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(total)


# -- temperature ------------------------------------------------------------------------------------------------
def _nll_single(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t
    s = s - s.max(axis=1, keepdims=True)
    logp = s[np.arange(len(y)), y] - np.log(np.exp(s).sum(axis=1))
    return float(-logp.mean())


def _nll_binary(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t  # -log sigmoid(s) for y = 1, -log sigmoid(-s) for y = 0, overflow-free
    return float(np.mean(np.logaddexp(0.0, -s) * y + np.logaddexp(0.0, s) * (1 - y)))


def _fit_t(nll) -> float:
    from scipy.optimize import minimize_scalar

    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    res = minimize_scalar(lambda u: nll(math.exp(u)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    t = math.exp(float(res.x))
    return t if nll(t) <= nll(1.0) else 1.0  # never worse than no scaling on the data it was fitted on


def fit_temperature(task: str, labels: Any, logits: Any) -> float | list[float]:
    """The temperature(s) minimising the NLL of ``labels`` under softmax(z / T) (multi-label: sigmoid(z_l / T_l),
    one per label). A multi-label label with one class only in the data keeps T = 1: its NLL has no minimum."""
    z = _logits(task, logits)
    y = _labels(task, labels, z)
    if task != "multi-label":
        return _fit_t(lambda t: _nll_single(z, y, t))
    temps = []
    for k in range(z.shape[1]):
        yk = y[:, k]
        temps.append(_fit_t(lambda t, k=k, yk=yk: _nll_binary(z[:, k], yk, t)) if 0 < yk.sum() < len(yk) else 1.0)
    return temps


# -- conformal scores -------------------------------------------------------------------------------------------
def _scores(task: str, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nonconformity score 1 - p(true label): (N,) single-label, (N, L) multi-label (per label, p of its truth)."""
    if task == "multi-label":
        return 1.0 - np.where(y == 1, probs, 1.0 - probs)
    return 1.0 - probs[np.arange(len(y)), y]


def check_coverage(coverage: float) -> float:
    try:
        c = float(coverage)
    except (TypeError, ValueError):
        raise DataError(f"coverage {coverage!r} is not a number: give one between 0 and 1, e.g. 0.9") from None
    if not 0.0 < c < 1.0:
        raise DataError(f"coverage {coverage} must lie strictly between 0 and 1 (e.g. 0.9 for 90%)")
    return c


def quantile(sorted_scores: Sequence[float], coverage: float) -> float:
    """Split-conformal threshold: the ceil((n + 1) * coverage)-th smallest score (finite-sample correction). When
    that rank exceeds n (too few validation images for the coverage asked) the threshold is 1: every label."""
    c = check_coverage(coverage)
    n = len(sorted_scores)
    k = math.ceil((n + 1) * c - 1e-9)  # 1e-9: (n + 1) * 0.9 must not become k + 1 by rounding
    return 1.0 if k > n else float(sorted_scores[k - 1])


def fit_calibration(task: str, labels: Any, logits: Any, coverage: float = DEFAULT_COVERAGE,
                    fitted_on: str = "val") -> dict[str, Any]:
    """The JSON-able calibration record for ``card["calibration"]`` from validation ``logits`` and ``labels``."""
    if fitted_on == "test":
        raise DataError("calibration is fitted on the validation split, never on test (test measures it)")
    coverage = check_coverage(coverage)
    z = _logits(task, logits)
    y = _labels(task, labels, z)
    temperature = fit_temperature(task, y, z)
    before = _scaled_probabilities(task, z, 1.0)
    after = _scaled_probabilities(task, z, temperature)
    scores = _scores(task, after, y)
    if task == "multi-label":
        val_scores = [np.round(np.sort(scores[:, k]), DIGITS).tolist() for k in range(z.shape[1])]
    else:
        val_scores = np.round(np.sort(scores), DIGITS).tolist()
    on_bound = [t for t in np.atleast_1d(temperature) if min(abs(t - b) / b for b in T_BOUNDS) < 1e-3]
    record = {
        "method": METHOD, "temperature": temperature, "fitted_on": fitted_on, "n": int(len(y)), "task": task,
        "num_outputs": int(z.shape[1]),
        "nll_val_before": _nll(task, z, y, 1.0), "nll_val_after": _nll(task, z, y, temperature),
        "ece_val_before": ece(task, y, before), "ece_val_after": ece(task, y, after), "ece_bins": ECE_BINS,
        "conformal": {"score": SCORE, "per_label": task == "multi-label", "val_scores": val_scores,
                      "default_coverage": coverage},
    }
    if on_bound:
        record["note"] = (f"temperature at its search bound {T_BOUNDS}: the validation logits are nearly all "
                          "right or wrong with no overlap; treat the calibrated probabilities with care")
    return record


def _nll(task: str, z: np.ndarray, y: np.ndarray, temperature: Any) -> float:
    if task != "multi-label":
        return _nll_single(z, y, float(temperature))
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (z.shape[1],))
    return float(np.mean([_nll_binary(z[:, k], y[:, k], t[k]) for k in range(z.shape[1])]))


# -- applying a record --------------------------------------------------------------------------------------------
def check_record(record: Any, task: str, num_outputs: int | None = None, where: str = "the model card") -> dict:
    """``record`` if it is a calibration record usable for ``task`` (and ``num_outputs``), else an ArtifactError
    naming what is wrong: a malformed record must not quietly give wrong probabilities or sets."""
    fix = "the model owner re-runs `medhe calibrate MODEL_DIR` (or deletes the calibration entry)"

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"the calibration record in {where} is malformed ({why}); {fix}")

    if not isinstance(record, dict):
        raise bad("not an object")
    if record.get("method") != METHOD:
        raise bad(f"method {record.get('method')!r}, expected {METHOD!r}")
    multi = task == "multi-label"
    t = record.get("temperature")
    temps = t if multi and isinstance(t, list) else [t]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in temps):
        raise bad("temperature must be a positive number" + (" per label" if multi else ""))
    conf = record.get("conformal")
    if not isinstance(conf, dict):
        raise bad("no conformal block")
    scores = conf.get("val_scores")
    lists = scores if multi else [scores]
    if multi and not (isinstance(scores, list) and all(isinstance(s, list) for s in scores)):
        raise bad("multi-label val_scores must be one list per label")
    for s in lists:
        if not isinstance(s, list) or not s or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in s):
            raise bad("val_scores must be a non-empty list of numbers")
        arr = np.asarray(s, dtype=np.float64)
        if not (np.all(np.isfinite(arr)) and np.all(np.diff(arr) >= 0) and arr[0] >= 0 and arr[-1] <= 1):
            raise bad("val_scores must be sorted numbers in [0, 1]")
    if num_outputs is not None:
        count = record.get("num_outputs", num_outputs)
        if count != num_outputs or (multi and (len(lists) != num_outputs
                                               or (isinstance(t, list) and len(t) != num_outputs))):
            raise bad(f"it was fitted for {count} outputs, the model has {num_outputs}")
    if "default_coverage" in conf:
        try:
            check_coverage(conf["default_coverage"])
        except DataError:
            raise bad(f"default_coverage {conf['default_coverage']!r} is not between 0 and 1") from None
    return record


def calibrated_probabilities(record: dict, task: str, logits: Any) -> np.ndarray:
    """softmax(z / T) (multi-label: sigmoid(z_l / T_l)) of ``logits`` (N, K) or (K,), shape (N, K)."""
    z = _logits(task, logits)
    check_record(record, task, z.shape[1])
    return _scaled_probabilities(task, z, record["temperature"])


def thresholds(record: dict, task: str, coverage: float | None = None) -> list[float]:
    """The conformal score threshold(s) at ``coverage`` (default: the record's): one, or one per label."""
    check_record(record, task)
    conf = record["conformal"]
    coverage = conf.get("default_coverage", DEFAULT_COVERAGE) if coverage is None else coverage
    lists = conf["val_scores"] if task == "multi-label" else [conf["val_scores"]]
    return [quantile(s, coverage) for s in lists]


def prediction_sets(record: dict, task: str, logits: Any, coverage: float | None = None) -> list:
    """Per image, the conformal set at ``coverage`` (default: the record's default_coverage).

    Single-label: a sorted list of class indices (may be empty: see the module docstring). Multi-label: per label a
    sorted sublist of [0, 1] (0 = negative, 1 = positive), i.e. [[1], [0, 1], [0], ...] per image.
    """
    probs = calibrated_probabilities(record, task, logits)
    q = np.asarray(thresholds(record, task, coverage))
    if task == "multi-label":
        pos = (1.0 - probs) <= q  # score of "positive" is 1 - p
        neg = probs <= q  # score of "negative" is 1 - (1 - p) = p
        return [[[c for c, ok in ((0, n), (1, p)) if ok] for n, p in zip(nrow, prow)]
                for nrow, prow in zip(neg, pos)]
    inside = (1.0 - probs) <= q[0]
    return [np.flatnonzero(row).tolist() for row in inside]


def describe_set(task: str, labels: Sequence[str], pset: list) -> str:
    """Words for one image's set: "pneumonia", "uncertain: both", "uncertain: neither label reaches ..."."""
    if task == "multi-label":
        found = [labels[k] for k, s in enumerate(pset) if s == [1]]
        unsure = [labels[k] for k, s in enumerate(pset) if len(s) != 1]
        text = ", ".join(found) or "no finding"
        return text + (f"; uncertain: {', '.join(unsure)}" if unsure else "")
    if len(pset) == 1:
        return str(labels[pset[0]])
    if not pset:
        return ("uncertain: neither label reaches the set's threshold" if len(labels) == 2
                else "uncertain: no label reaches the set's threshold")
    if len(pset) == len(labels) == 2:
        return "uncertain: both"
    return "uncertain: " + " or ".join(str(labels[k]) for k in pset)


def is_decided(task: str, pset: list) -> bool:
    """Whether a set is a diagnosis: one label (multi-label: every label's set is a single answer)."""
    return all(len(s) == 1 for s in pset) if task == "multi-label" else len(pset) == 1


def set_summary(task: str, labels: Any, sets: list) -> dict[str, Any]:
    """Empirical coverage, mean set size and shares of singleton/empty sets (multi-label: over image-label pairs)."""
    if task == "multi-label":
        y = np.asarray(labels).astype(np.int64).reshape(len(sets), -1)
        flat = [(s, int(t)) for row, trow in zip(sets, y) for s, t in zip(row, trow)]
    else:
        flat = list(zip(sets, np.asarray(labels).astype(np.int64).reshape(-1).tolist()))
    if not flat:
        raise DataError("no images to measure the prediction sets on")
    sizes = np.array([len(s) for s, _ in flat])
    return {"n": int(len(sets)), "coverage": float(np.mean([t in s for s, t in flat])),
            "mean_set_size": float(sizes.mean()), "singletons": float(np.mean(sizes == 1)),
            "empty": float(np.mean(sizes == 0))}


def evaluation_block(record: dict, task: str, labels: Any, plain_logits: Any, encrypted_logits: Any = None,
                     coverage: float | None = None) -> dict[str, Any]:
    """The ``calibration`` block of an evaluation report: ECE before/after and conformal set statistics for the
    plain logits and, when given, the encrypted ones (which may cover the first images only)."""
    z = _logits(task, plain_logits)
    check_record(record, task, z.shape[1])
    conf = record["conformal"]
    coverage = check_coverage(conf.get("default_coverage", DEFAULT_COVERAGE) if coverage is None else coverage)
    y = np.asarray(labels)

    def side(logits: np.ndarray, y_part: np.ndarray) -> tuple[dict[str, Any], list]:
        sets = prediction_sets(record, task, logits, coverage)
        return {"ece_before": ece(task, y_part, _scaled_probabilities(task, logits, 1.0)),
                "ece_after": ece(task, y_part, calibrated_probabilities(record, task, logits)),
                **set_summary(task, y_part, sets)}, sets

    plain, plain_sets = side(z, y)
    block: dict[str, Any] = {"method": record["method"], "temperature": record["temperature"],
                             "fitted_on": record.get("fitted_on"), "n_fitted": record.get("n"),
                             "coverage_target": coverage, "plain": plain, "encrypted": None,
                             "sets_identical_plain_encrypted": None}
    if encrypted_logits is not None and len(encrypted_logits):
        e = _logits(task, encrypted_logits)
        enc, enc_sets = side(e, y[:len(e)])
        block["encrypted"] = enc
        block["sets_identical_plain_encrypted"] = bool(enc_sets == plain_sets[:len(e)])
    return block
