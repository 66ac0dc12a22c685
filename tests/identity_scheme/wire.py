"""The toy scheme's messages: a 4-byte magic, a kind byte, then little-endian float32 values (keys: 16 bytes
that name the session, from the OS's CSPRNG)."""

from __future__ import annotations

import numpy as np

from medhe.errors import CiphertextError

MAGIC = b"MHID"
KEYS, INPUT, OUTPUT = 1, 2, 3
KEY_BYTES = len(MAGIC) + 1 + 16


def pack(kind: int, values: np.ndarray) -> bytes:
    return MAGIC + bytes([kind]) + np.ascontiguousarray(values, dtype="<f4").tobytes()


def unpack(data: bytes, kind: int, count: int, what: str) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray)) or data[:4] != MAGIC or len(data) < 5 or data[4] != kind:
        raise CiphertextError(f"{what} is not an identity-scheme message of kind {kind}")
    if len(data) != 5 + 4 * count:
        raise CiphertextError(f"{what} holds {(len(data) - 5) / 4:g} values; this model takes {count}")
    values = np.frombuffer(bytes(data[5:]), dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise CiphertextError(f"{what} holds values that are not finite")
    return values
