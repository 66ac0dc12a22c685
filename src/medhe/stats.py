"""The one summary of timing samples every report and benchmark uses, so that "p95" means the same thing in all.

Percentiles are numpy's default (linear interpolation between order statistics); every latency block in every
JSON report has the same keys, whether it holds one sample (key generation) or thousands.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

#: keys of every latency summary, in this order
STAT_KEYS = ("n", "median", "p95", "mean", "min", "max")


def summarize(samples: Iterable[float], digits: int = 3) -> dict[str, float] | None:
    """``{n, median, p95, mean, min, max}`` of ``samples`` (``None`` when there are none: nothing was timed)."""
    arr = np.asarray([float(s) for s in samples], dtype=np.float64)
    if not arr.size:
        return None
    return {"n": int(arr.size), "median": round(float(np.median(arr)), digits),
            "p95": round(float(np.percentile(arr, 95)), digits), "mean": round(float(arr.mean()), digits),
            "min": round(float(arr.min()), digits), "max": round(float(arr.max()), digits)}


# -- bootstrap ------------------------------------------------------------------------------------------------------
#: resamples and seed of every bootstrap interval in the reports (P1 reports 95 % intervals from 1000 resamples)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap_counts(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     chunk: int = 64) -> Iterable[np.ndarray]:
    """Resamples of ``n`` items with replacement, as (k, n) float64 matrices of how often each item is drawn.

    Counts instead of index lists let a metric of every resample be one matrix product or one pass over data
    sorted once (a metric over a resample = the same metric with the counts as weights). Resample ``b`` is drawn
    alone from one generator, so the intervals depend on ``(n, resamples, seed)`` only, never on ``chunk``.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        counts = np.empty((k, n), dtype=np.float64)
        for row in range(k):
            counts[row] = np.bincount(rng.integers(0, n, n), minlength=n)
        yield counts


def percentile_interval(values: Iterable[float], level: float = 0.95) -> list[float] | None:
    """The percentile bootstrap interval ``[lo, hi]`` of ``values``, NaN (a resample where the metric is
    undefined) left out; ``None`` when no resample defined it."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return None
    lo, hi = np.percentile(arr, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]
