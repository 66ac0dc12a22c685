"""Framing of everything the CKKS client and server exchange: a small header, then length-prefixed parts.

Header: ``b"MHCK" | version u8 | kind u8 | plan id (16 bytes) | part count u16``, each part ``u32 length | bytes``.
The plan id ties keys and ciphertexts to one compiled model (its parameters, layout and rotations), so bytes
made for another model or another parameter set are refused before SEAL parses anything. The parts themselves
are ``serialize``'s compact, CRC-checked SEAL encodings.
"""

from __future__ import annotations

import struct

from medhe.errors import CiphertextError
from medhe.he.framing import Framing

MAGIC = b"MHCK"
VERSION = 1
#: key envelope versions: 1 = SEAL's GaloisKeys + RelinKeys; 2 = hybrid keys (``medhe.he.ckks.hybrid.wire``),
#: announced by a hybrid plan's spec as ``key_envelope.version``
KEY_ENVELOPE_SEAL, KEY_ENVELOPE_HYBRID = 1, 2
KIND_INPUT, KIND_KEYS, KIND_OUTPUT = 1, 2, 3
KIND_NAMES = {KIND_INPUT: "encrypted input", KIND_KEYS: "evaluation keys", KIND_OUTPUT: "encrypted result"}
_HEADER = struct.Struct("<4sBB16sH")
FRAMING = Framing("CKKS", MAGIC, VERSION, KIND_NAMES)
_FRAMINGS = {VERSION: FRAMING, KEY_ENVELOPE_HYBRID: Framing("CKKS", MAGIC, KEY_ENVELOPE_HYBRID, KIND_NAMES)}
_KEY_FORMATS = {KEY_ENVELOPE_SEAL: "SEAL's key format", KEY_ENVELOPE_HYBRID: "hybrid keys"}
_LEN = struct.Struct("<I")


def plan_id_bytes(plan_id: str) -> bytes:
    return bytes.fromhex(plan_id)[:16].ljust(16, b"\0")


def pack(kind: int, plan_id: str, parts: list[bytes], version: int = VERSION) -> bytes:
    out = [_HEADER.pack(MAGIC, version, kind, plan_id_bytes(plan_id), len(parts))]
    for part in parts:
        out.append(_LEN.pack(len(part)))
        out.append(part)
    return b"".join(out)


def unpack(data: bytes, kind: int, plan_id: str, version: int = VERSION) -> list[bytes]:
    """The parts of a message; ``CiphertextError`` naming the problem when it is not what this plan expects.

    ``version``: what this plan expects (keys: the key envelope version its spec announces).
    """
    framing = _FRAMINGS[version]
    what = framing.what(kind)
    if kind == KIND_KEYS and isinstance(data, (bytes, bytearray, memoryview)) and len(data) >= 6 \
            and bytes(data[:4]) == MAGIC and data[4] != version:
        got = data[4]
        raise CiphertextError(f"evaluation keys use key envelope version {got} "
                              f"({_KEY_FORMATS.get(got, 'unknown to this medhe')}), but this model's spec announces "
                              f"key envelope version {version} ({_KEY_FORMATS[version]}): create the keys with a "
                              f"medhe client that speaks version {version} (the spec's 'key_envelope')")
    view, (_magic, _version, _kind, pid, count) = framing.open(data, kind, _HEADER)
    FRAMING.check_binding(kind, pid, plan_id_bytes(plan_id), "another model or parameter set",
                          "fetch this server's spec, then create keys and encrypt again")
    data = bytes(view)
    parts, pos = [], _HEADER.size
    for _ in range(count):
        if pos + _LEN.size > len(data):
            raise CiphertextError(f"{what} is truncated: send the complete bytes medhe produced")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if pos + n > len(data):
            raise CiphertextError(f"{what} is truncated: send the complete bytes medhe produced")
        parts.append(data[pos:pos + n])
        pos += n
    if pos != len(data):
        raise CiphertextError(f"{what} has {len(data) - pos} unexpected trailing bytes: send exactly medhe's bytes")
    return parts
