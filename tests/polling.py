"""Bounded polling for the tests that wait on a real server's state (a fixed sleep is either slow or flaky)."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float = 20.0, step: float = 0.2):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else its last value (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()
