"""What benchmarks record about the machine they ran on: wall-clock figures mean little without its load."""

from __future__ import annotations

import os


def load_average() -> float | None:
    """The 1-minute load average, rounded to 0.01 (``None`` where the OS does not report one)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
