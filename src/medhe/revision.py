"""Which code is running: the git commit of the checkout medhe is imported from, or ``"unknown"``.

Model cards and evaluation reports record it so a result can be traced to the code that produced it months later.
An installed wheel is not a checkout, so it honestly answers ``"unknown"`` rather than guessing from a version number.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

UNKNOWN = "unknown"
_PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def code_revision(where: str | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding ``where`` (default: this package), if that repository is a
    medhe source tree; uncommitted changes are not captured."""
    folder = Path(where) if where else _PACKAGE
    try:
        top = _git(folder, "rev-parse", "--show-toplevel")
        if not (Path(top) / "src" / "medhe").is_dir():  # site-packages inside some other repository: not ours
            return UNKNOWN
        head = _git(folder, "rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return head if len(head) == 40 else UNKNOWN


def _git(folder: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()
