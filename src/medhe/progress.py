"""A ticking status line for long steps that have no natural count (compiling, key generation, a remote call)."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def busy(desc: str, enabled: bool = True) -> Iterator[None]:
    """Show ``desc: 12s`` on stderr, refreshed twice a second, while the block runs (nothing when disabled)."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", leave=False, file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()
