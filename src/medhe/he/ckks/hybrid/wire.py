"""Key envelope version 2: hybrid evaluation keys on the wire.

``envelope`` framing (magic, version 2, kind keys, plan id) with parts ``[index, digit frames...]``. The index is
``u32 count`` then per key ``u32 Galois element (0: relinearization) | u8 level | u8 digits``: the highest level
the plan uses the key at and how many digit frames follow for it -- exactly the digits that level reads
(``ceil((level + 1) / alpha)``), so a key used low in the chain is sent shorter. Each frame is a compact,
CRC-checked seeded SEAL ciphertext of the key context (``keygen.HybridKeyGenerator.compact_key``).
"""

from __future__ import annotations

import struct
from typing import Any

from medhe.errors import CiphertextError
from medhe.he.ckks.hybrid.planner import digits_at
from medhe.he.ckks.wire import envelope

_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<IBB")
RELIN = 0  # the index's element for the relinearization key


def pack_keys(plan_id: str, keys: list[tuple[int, int, list[bytes]]]) -> bytes:
    """``keys``: (Galois element or 0, level, digit frames) -> the version-2 key envelope."""
    index = _COUNT.pack(len(keys)) + b"".join(_ENTRY.pack(int(e), int(lv), len(f)) for e, lv, f in keys)
    parts = [index] + [frame for _, _, frames in keys for frame in frames]
    return envelope.pack(envelope.KIND_KEYS, plan_id, parts, version=envelope.KEY_ENVELOPE_HYBRID)


def unpack_keys(data: bytes, plan_id: str, alpha: int, need: dict[int, int]) -> dict[int, tuple[int, list[bytes]]]:
    """The version-2 envelope -> {element: (level, frames)}; ``need``: element -> level the plan uses it at.

    ``CiphertextError`` (one line) for another version, a malformed index, a missing key, a key sent for fewer
    levels than the plan needs, or the wrong number of digits.
    """
    parts = envelope.unpack(data, envelope.KIND_KEYS, plan_id, version=envelope.KEY_ENVELOPE_HYBRID)
    if not parts or len(parts[0]) < _COUNT.size:
        raise CiphertextError("evaluation keys lack their index: create them with this server's spec")
    (count,) = _COUNT.unpack_from(parts[0])
    if len(parts[0]) != _COUNT.size + count * _ENTRY.size:
        raise CiphertextError("evaluation keys have a malformed index: create them with this server's spec")
    out: dict[int, tuple[int, list[bytes]]] = {}
    pos = 1
    for i in range(count):
        element, level, digits = _ENTRY.unpack_from(parts[0], _COUNT.size + i * _ENTRY.size)
        what = "the relinearization key" if element == RELIN else f"the Galois key for element {element}"
        if element in out:
            raise CiphertextError(f"evaluation keys hold {what} twice: create them with this server's spec")
        if digits != digits_at(level, alpha):
            raise CiphertextError(f"{what} has {digits} digits, but level {level} reads {digits_at(level, alpha)}: "
                                  "create the keys with this server's spec")
        if pos + digits > len(parts):
            raise CiphertextError("evaluation keys are truncated (fewer digits than their index says): send them "
                                  "again")
        out[element] = (level, parts[pos:pos + digits])
        pos += digits
    if pos != len(parts):
        raise CiphertextError("evaluation keys hold more digits than their index says: create them with this "
                              "server's spec")
    for element, level in need.items():
        what = "the relinearization key" if element == RELIN else f"the Galois key for element {element}"
        if element not in out:
            raise CiphertextError(f"evaluation keys lack {what}: create them with this server's spec")
        if out[element][0] < level:
            raise CiphertextError(f"{what} was sent for levels up to {out[element][0]}, but this model uses it at "
                                  f"level {level}: create the keys with this server's spec")
    return out


def needed(plan_public: dict[str, Any], galois_element) -> dict[int, int]:
    """Element -> level for every key a plan's spec asks for (``galois_element``: step -> element)."""
    levels = plan_public["key_levels"]
    top = int(plan_public["input"]["level"])
    need = {int(galois_element(int(s))): int(levels["galois"].get(str(s), top)) for s in plan_public["rotation_steps"]}
    if plan_public["relinearization"]:
        need[RELIN] = int(levels["relin"])
    return need
