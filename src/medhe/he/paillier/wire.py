"""Compact byte format for Paillier public keys and ciphertext vectors.

Layout (big-endian): a 36-byte header, ``count`` fixed-width integers, then a 16-byte SHA-256 digest of everything
before it. The header names what the bytes are (key, encrypted features, encrypted scores), the key they belong
to (fingerprint = SHA-256 of n, 16 bytes), the vector length and the fixed-point scale, so that bytes made for
another key, model or scale are refused with a message instead of decrypting to garbage.

The digest catches truncation and accidental corruption. It is not authentication: Paillier ciphertexts are
malleable by design (that is what lets the server compute on them), so integrity against an active attacker
would need a MAC or TLS around the channel — the threat model here is a semi-honest server.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from medhe.errors import CiphertextError
from medhe.he.framing import Framing

MAGIC = b"MHPL"
VERSION = 1
KIND_PUBLIC_KEY, KIND_FEATURES, KIND_SCORES = 1, 2, 3
KIND_NAMES = {KIND_PUBLIC_KEY: "public key", KIND_FEATURES: "encrypted features", KIND_SCORES: "encrypted scores"}
_HEADER = struct.Struct(">4sBB16sIHHHI")  # magic, version, kind, fingerprint, count, scale, slot_bits, slots, width
_DIGEST = 16
FRAMING = Framing("Paillier", MAGIC, VERSION, KIND_NAMES)
MAX_COUNT = 1 << 16  # far above any feature vector medhe ships; bounds the memory a hostile header can claim


@dataclass(frozen=True)
class Message:
    kind: int
    fingerprint: bytes
    values: list[int]
    scale: int = 0
    slot_bits: int = 0
    slots: int = 0


def fingerprint(n: int) -> bytes:
    """16 bytes identifying a Paillier modulus."""
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).digest()[:16]


def dumps(msg: Message, width: int) -> bytes:
    """Serialize ``msg`` with every integer in ``width`` bytes."""
    header = _HEADER.pack(MAGIC, VERSION, msg.kind, msg.fingerprint, len(msg.values), msg.scale, msg.slot_bits,
                          msg.slots, width)
    body = b"".join(int(v).to_bytes(width, "big") for v in msg.values)
    return header + body + hashlib.sha256(header + body).digest()[:_DIGEST]


def loads(data: bytes, kind: int) -> Message:
    """Parse and check framing; raises ``CiphertextError`` naming what is wrong."""
    what = FRAMING.what(kind)
    view, (_magic, _version, got_kind, fp, count, scale, slot_bits, slots, width) = FRAMING.open(data, kind, _HEADER)
    data = bytes(view)
    if len(data) < _HEADER.size + _DIGEST:
        raise CiphertextError(f"{what} truncated ({len(data)} bytes): resend the complete message")
    if count > MAX_COUNT or width == 0 or width > 4096:
        raise CiphertextError(f"{what} header is implausible (count {count}, width {width}): "
                              "the message is corrupted")
    expected = _HEADER.size + count * width + _DIGEST
    FRAMING.check_size(kind, len(data), expected)
    body_end = expected - _DIGEST
    FRAMING.check_checksum(kind, hashlib.sha256(data[:body_end]).digest()[:_DIGEST] == data[body_end:])
    values = [int.from_bytes(data[_HEADER.size + i * width:_HEADER.size + (i + 1) * width], "big")
              for i in range(count)]
    return Message(got_kind, fp, values, scale, slot_bits, slots)
