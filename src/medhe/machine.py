"""What benchmarks and reports record about the machine they ran on: wall-clock figures mean little without it."""

from __future__ import annotations

import os
import platform
from typing import Any


def load_average() -> float | None:
    """The 1-minute load average, rounded to 0.01 (``None`` where the OS does not report one)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """The ``machine`` block of every report: one set of names (``cpus``, not ``cpu_count`` or ``host``)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "load_average_1m": load_average()}
