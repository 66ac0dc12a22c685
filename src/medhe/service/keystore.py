"""Server-side store of clients' evaluation keys: LRU with a total-bytes cap and an idle expiry.

Evaluation keys are large (megabytes to hundreds of megabytes) and public, but the server must not grow without
bound because clients upload them: a total-bytes cap evicts the least recently used keys, and keys nobody used for
``ttl`` seconds expire. A client whose key id is gone simply registers its keys again.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from medhe.errors import MedheError


class KeyTooLarge(MedheError):
    """One key set is larger than the whole store may hold."""


@dataclass
class KeyEntry:
    """One client's registered keys: the model they belong to, the payload and its accounted size."""

    key_id: str
    model: str
    value: Any
    size: int
    created: float
    last_used: float = field(default=0.0)


class KeyStore:
    """Thread-safe LRU of key entries bounded by ``max_bytes``; entries idle for ``ttl`` seconds expire.

    ``ttl=None`` disables expiry (the worker-side cache of deserialized keys uses that; the main store decides
    which keys are alive).
    """

    def __init__(self, max_bytes: int, ttl: float | None = 3600.0, clock: Callable[[], float] = time.monotonic):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = int(max_bytes)
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, KeyEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    # -- mutation --------------------------------------------------------------------------------------------------
    def add(self, model: str, value: Any, size: int, key_id: str | None = None) -> KeyEntry:
        """Store ``value`` (``size`` bytes) under a fresh unguessable id, evicting the least recently used keys."""
        if size > self.max_bytes:
            raise KeyTooLarge(
                f"evaluation keys of {size} bytes exceed the server's key store of {self.max_bytes} bytes; "
                "ask the operator to raise --max-key-bytes")
        now = self._clock()
        entry = KeyEntry(key_id or secrets.token_urlsafe(18), model, value, int(size), now, now)
        with self._lock:
            self._expire(now)
            old = self._entries.pop(entry.key_id, None)
            if old is not None:
                self._bytes -= old.size
            while self._entries and self._bytes + entry.size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
            self._entries[entry.key_id] = entry
            self._bytes += entry.size
        return entry

    def get(self, key_id: str) -> KeyEntry | None:
        """The entry for ``key_id`` (marking it recently used), or ``None`` if unknown, evicted or expired."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._entries.get(key_id)
            if entry is None:
                return None
            entry.last_used = now
            self._entries.move_to_end(key_id)
            return entry

    def remove(self, key_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key_id, None)
            if entry is None:
                return False
            self._bytes -= entry.size
            return True

    def _expire(self, now: float) -> None:
        if self.ttl is None:
            return
        # Entries are in LRU order, so the idle ones sit at the front.
        while self._entries:
            key_id, entry = next(iter(self._entries.items()))
            if now - entry.last_used <= self.ttl:
                break
            del self._entries[key_id]
            self._bytes -= entry.size

    # -- introspection ---------------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)

    def __contains__(self, key_id: object) -> bool:
        with self._lock:
            self._expire(self._clock())
            return key_id in self._entries
