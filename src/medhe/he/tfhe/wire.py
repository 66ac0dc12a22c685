"""Framing for TFHE bytes (evaluation keys, input and output ciphertexts) between client and server.

Concrete's own serialization says nothing about which circuit a blob belongs to, and a ciphertext made for another
circuit can crash or silently decrypt to garbage. So every blob carries a header: magic, format version, kind,
the circuit fingerprint (SHA-256 of the client specs) and the payload length and CRC-32. The CRC catches
truncation and accidental corruption, not an active attacker (the threat model is a semi-honest server).
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from medhe.he.framing import Framing

MAGIC = b"MHTF"
VERSION = 1
KIND_KEYS, KIND_INPUT, KIND_OUTPUT = 1, 2, 3
KIND_NAMES = {KIND_KEYS: "evaluation keys", KIND_INPUT: "input ciphertext", KIND_OUTPUT: "output ciphertext"}
_HEADER = struct.Struct("<4sBB16sQI")  # magic, version, kind, fingerprint, payload length, crc32
FRAMING = Framing("TFHE", MAGIC, VERSION, KIND_NAMES)


def fingerprint(client_specs: bytes) -> bytes:
    """16 bytes naming one compiled circuit and its crypto parameters."""
    return hashlib.sha256(client_specs).digest()[:16]


def pack(kind: int, fp: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, kind, fp, len(payload), zlib.crc32(payload)) + payload


def unpack(data: bytes, kind: int, fp: bytes) -> bytes:
    """Check the frame and return the Concrete payload; raises ``CiphertextError`` naming what is wrong."""
    data, (_magic, _version, _kind, got_fp, length, crc) = FRAMING.open(data, kind, _HEADER)
    FRAMING.check_binding(kind, got_fp, fp, "another circuit or parameters",
                          "fetch this server's spec and make new keys")
    payload = data[_HEADER.size:]
    FRAMING.check_size(kind, len(payload), length)
    FRAMING.check_checksum(kind, zlib.crc32(payload) == crc)
    return bytes(payload)
