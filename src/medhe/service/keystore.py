"""Server-side store of clients' evaluation keys: LRU with byte and count caps and an idle expiry.

Evaluation keys are large (megabytes to hundreds of megabytes once loaded) and public, but the server must not
grow without bound because clients upload them: a total-bytes cap (bytes *held*, as the caller accounts them), a
total count cap and a per-owner count cap evict the least recently used keys (for the per-owner cap: that owner's
own), and keys nobody used for ``ttl`` seconds expire. A client whose key id is gone simply registers again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from medhe.errors import MedheError


class KeyTooLarge(MedheError):
    """One key set is larger than the whole store may hold."""


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def secret_matches(entry: "KeyEntry", secret: str) -> bool:
    """Constant-time comparison of fixed-length digests: timing says nothing about the stored secret."""
    return hmac.compare_digest(entry.secret_hash, hash_secret(secret))


@dataclass
class KeyEntry:
    """One client's registered keys: the model they belong to, the payload and its accounted size."""

    key_id: str
    model: str
    value: Any
    size: int
    created: float
    last_used: float = field(default=0.0)
    owner: str = ""  # who registered it (the client's address): the per-owner cap counts by this
    secret_hash: bytes = b""  # SHA-256 of the key secret returned at registration (the server keeps no secret)


class KeyStore:
    """Thread-safe LRU of key entries bounded by ``max_bytes``; entries idle for ``ttl`` seconds expire.

    ``ttl=None`` disables expiry (the worker-side cache of deserialized keys uses that; the main store decides
    which keys are alive).
    """

    def __init__(self, max_bytes: int, ttl: float | None = 3600.0, clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[KeyEntry], None] | None = None, max_count: int | None = None,
                 max_per_owner: int | None = None):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = int(max_bytes)
        self.max_count = max_count
        self.max_per_owner = max_per_owner
        self.ttl = ttl
        self._clock = clock
        self._on_evict = on_evict  # told about every entry dropped by the LRU cap or expiry (not by remove())
        self._entries: OrderedDict[str, KeyEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    # -- mutation --------------------------------------------------------------------------------------------------
    def add(self, model: str, value: Any, size: int, key_id: str | None = None, owner: str = "",
            secret_hash: bytes = b"") -> KeyEntry:
        """Store ``value`` (``size`` bytes) under a fresh unguessable id, evicting the least recently used keys."""
        if size > self.max_bytes:
            raise KeyTooLarge(
                f"evaluation keys holding {size} bytes once loaded exceed the server's key memory of "
                f"{self.max_bytes} bytes; ask the operator to raise --max-key-bytes")
        now = self._clock()
        entry = KeyEntry(key_id or secrets.token_urlsafe(18), model, value, int(size), now, now, owner, secret_hash)
        with self._lock:
            dropped = self._expire(now)
            old = self._entries.pop(entry.key_id, None)
            if old is not None:
                self._bytes -= old.size
            if self.max_per_owner is not None:
                mine = [e for e in self._entries.values() if e.owner == owner]  # LRU order
                while len(mine) >= self.max_per_owner:
                    evicted = mine.pop(0)
                    del self._entries[evicted.key_id]
                    self._bytes -= evicted.size
                    dropped.append(evicted)
            while self._entries and (self._bytes + entry.size > self.max_bytes or
                                     (self.max_count is not None and len(self._entries) >= self.max_count)):
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
                dropped.append(evicted)
            self._entries[entry.key_id] = entry
            self._bytes += entry.size
        self._notify(dropped)
        return entry

    def get(self, key_id: str, secret: str | None = None) -> KeyEntry | None:
        """The entry for ``key_id`` (marking it recently used), or ``None`` if unknown, evicted or expired.

        With ``secret``: also ``None`` unless it is the secret returned at registration (compared in constant
        time, on hashes), so a wrong secret and an unknown id look the same to the caller's client.
        """
        now = self._clock()
        with self._lock:
            dropped = self._expire(now)
            entry = self._entries.get(key_id)
            if entry is not None and secret is not None and not secret_matches(entry, secret):
                entry = None
            if entry is not None:
                entry.last_used = now
                self._entries.move_to_end(key_id)
        self._notify(dropped)
        return entry

    def remove(self, key_id: str, secret: str | None = None) -> KeyEntry | None:
        """Drop ``key_id`` (only if ``secret`` matches, when given); returns the removed entry, else ``None``."""
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is None or (secret is not None and not secret_matches(entry, secret)):
                return None
            del self._entries[key_id]
            self._bytes -= entry.size
            return entry

    def remove_where(self, predicate: Callable[[KeyEntry], bool]) -> list[KeyEntry]:
        """Drop every entry matching ``predicate`` (e.g. keys held by a worker that died)."""
        with self._lock:
            gone = [e for e in self._entries.values() if predicate(e)]
            for e in gone:
                del self._entries[e.key_id]
                self._bytes -= e.size
            return gone

    def _expire(self, now: float) -> list[KeyEntry]:
        dropped: list[KeyEntry] = []
        if self.ttl is None:
            return dropped
        # Entries are in LRU order, so the idle ones sit at the front.
        while self._entries:
            key_id, entry = next(iter(self._entries.items()))
            if now - entry.last_used <= self.ttl:
                break
            del self._entries[key_id]
            self._bytes -= entry.size
            dropped.append(entry)
        return dropped

    def _notify(self, dropped: list[KeyEntry]) -> None:
        if self._on_evict is not None:
            for entry in dropped:
                self._on_evict(entry)

    # -- introspection ---------------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        with self._lock:
            dropped = self._expire(self._clock())
            n = len(self._entries)
        self._notify(dropped)
        return n

    def __contains__(self, key_id: object) -> bool:
        with self._lock:
            dropped = self._expire(self._clock())
            found = key_id in self._entries
        self._notify(dropped)
        return found
