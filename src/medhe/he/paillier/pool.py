"""Re-randomisation factors Enc_pk(0) = r^n mod n^2, computed ahead of need so a request does not wait for one.

The server multiplies every reply by a fresh encryption of zero (see ``server.py``). That factor does not depend on
the request, only on the client's public key, and computing it (one 3072-bit exponentiation mod n^2) is about three
quarters of the server's work per request. ``RerandomizerPool`` keeps a few of them per loaded key:

- every factor is phe's own ``raw_encrypt(0)`` (phe draws r with ``random.SystemRandom``, the OS CSPRNG, and
  returns r^n mod n^2); medhe computes nothing cryptographic here;
- ``take()`` removes the factor from the pool under a lock before returning it, so each one is handed out once
  and never again; an empty pool falls back to computing a fresh factor inline (same result, slower);
- a pool inherited through ``fork()`` is emptied in the child (``take`` checks the process id), and pickling a
  pool yields an empty one: two processes never hold copies of the same factors;
- a new key's pool aims at ``INITIAL_TARGET`` factors, one more per request up to its capacity, so a key used
  once costs little background work;
- one background thread per process refills the pools, but only while no request is being evaluated and none
  arrived in the last ``IDLE_S`` seconds: gmpy2 keeps the GIL during an exponentiation, so filling while a request
  runs would delay it. A request that arrives during a refill waits for at most one exponentiation.
  The total number of pooled factors per process is capped (``MAX_POOLED``), most recently used keys first.

Reusing a factor would let a client that sees two replies learn their ratio, i.e. the difference of the scores
under the *server's* randomness, and give up the guarantee that the reply's randomness is independent of W.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from typing import Any

import gmpy2
from phe import paillier

#: Factors kept per key (768 bytes each at 3072 bits).
DEFAULT_POOL_SIZE = 16
#: A fresh key's pool starts at this target and grows by one per request up to the capacity, so keys used once
#: cost little background work.
INITIAL_TARGET = 4
#: Cap on pooled factors over all keys of one process (~3 MB at 3072 bits).
MAX_POOLED = 4096
#: The refill thread waits until the server has been idle this long.
IDLE_S = 0.05


class RerandomizerPool:
    """Fresh encryptions of zero under one public key; each is handed out exactly once."""

    def __init__(self, public_key: paillier.PaillierPublicKey, capacity: int = DEFAULT_POOL_SIZE,
                 background: bool = True) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"pool capacity must be a non-negative integer, not {capacity!r}")
        self.public_key = public_key
        self.capacity = capacity
        self.background = background
        self.target = min(INITIAL_TARGET, capacity) if background else capacity
        self._items: collections.deque[gmpy2.mpz] = collections.deque()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.hits = 0  # factors served from the pool
        self.misses = 0  # factors computed inline because the pool was empty
        self.last_used = time.monotonic()
        if background and capacity:
            _FILLER.register(self)

    # -- the request path ----------------------------------------------------------------------------------------
    def take(self) -> gmpy2.mpz:
        """A fresh Enc_pk(0): from the pool if one is ready (removed from it), else computed now."""
        factor = None
        with self._lock:
            self._forget_if_forked()
            self.last_used = time.monotonic()
            self.target = min(self.target + 1, self.capacity)
            if self._items:
                factor = self._items.popleft()
                self.hits += 1
            else:
                self.misses += 1
        if factor is None:
            factor = self._fresh()
        if self.background and self.capacity:
            _FILLER.wake()
        return factor

    # -- filling -------------------------------------------------------------------------------------------------
    def _fresh(self) -> gmpy2.mpz:
        # phe: r = SystemRandom().randrange(1, n); returns (1 + 0*n) * r^n mod n^2 = r^n mod n^2
        return gmpy2.mpz(self.public_key.raw_encrypt(0))

    def _forget_if_forked(self) -> None:
        if self._pid != os.getpid():  # a fork copied the parent's factors: the parent may still hand them out
            self._items.clear()
            self._pid = os.getpid()

    def missing(self, limit: int | None = None) -> int:
        """How many factors the pool lacks to reach ``limit`` (default: its current target)."""
        with self._lock:
            self._forget_if_forked()
            return max((self.target if limit is None else limit) - len(self._items), 0)

    def fill_one(self, limit: int | None = None) -> bool:
        """Compute one factor and add it if the pool holds fewer than ``limit`` (default: its target)."""
        limit = self.target if limit is None else min(limit, self.capacity)
        if not self.missing(limit):
            return False
        factor = self._fresh()
        with self._lock:
            self._forget_if_forked()
            if len(self._items) >= limit:
                return False
            self._items.append(factor)
        return True

    def fill(self, count: int | None = None) -> int:
        """Synchronously add up to ``count`` factors (default: until the capacity); returns how many were added."""
        added = 0
        while (count is None or added < count) and self.fill_one(self.capacity):
            added += 1
        return added

    def __len__(self) -> int:
        with self._lock:
            self._forget_if_forked()
            return len(self._items)

    def __reduce__(self) -> tuple[Any, ...]:  # a copy never carries the factors (they would be used twice)
        return (RerandomizerPool, (self.public_key, self.capacity, self.background))


class _Filler:
    """One daemon thread per process that tops up registered pools while the server is idle."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[RerandomizerPool] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._active = 0
        self._last_activity = 0.0

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks (a parent thread may have held them), no thread, inherited pools emptied."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._pid = os.getpid()
        self._active = 0
        for pool in list(self._pools):
            pool._lock = threading.Lock()
            pool._items.clear()
            pool._pid = os.getpid()

    def register(self, pool: RerandomizerPool) -> None:
        with self._lock:
            self._pools.add(pool)
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="medhe-paillier-pool", daemon=True)
                self._thread.start()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def busy(self) -> "_Busy":
        """Context manager the server wraps around each evaluation: the filler stays off while it runs."""
        return _Busy(self)

    def _idle_for(self) -> float:
        with self._lock:
            if self._active:
                return -1.0
            return time.monotonic() - self._last_activity

    def _next_pool(self) -> RerandomizerPool | None:
        with self._lock:
            pools = sorted(self._pools, key=lambda p: p.last_used, reverse=True)
        pooled = 0
        for p in pools:
            pooled += len(p)
        if pooled >= MAX_POOLED:
            return None
        for p in pools:
            if p.missing():
                return p
        return None

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                idle = self._idle_for()
                if idle < IDLE_S:
                    time.sleep(IDLE_S if idle < 0 else IDLE_S - idle)
                    continue
                pool = self._next_pool()
                if pool is None:
                    break
                try:
                    pool.fill_one()
                except Exception:  # never let the daemon die; the request path computes inline anyway
                    break


class _Busy:
    def __init__(self, filler: _Filler) -> None:
        self.filler = filler

    def __enter__(self) -> None:
        with self.filler._lock:
            self.filler._active += 1

    def __exit__(self, *exc: Any) -> None:
        with self.filler._lock:
            self.filler._active -= 1
            self.filler._last_activity = time.monotonic()


_FILLER = _Filler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_FILLER.reset_after_fork)


def busy() -> _Busy:
    """``with pool.busy(): ...`` around request handling keeps the background refill out of the way."""
    return _FILLER.busy()


def pooled_total() -> int:
    """Factors currently pooled in this process (for tests and diagnostics)."""
    with _FILLER._lock:
        pools = list(_FILLER._pools)
    return sum(len(p) for p in pools)
