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
