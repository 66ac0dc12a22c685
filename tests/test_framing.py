"""The common header checks of every medhe wire format give the same clear errors."""

from __future__ import annotations

import struct

import pytest

from medhe.errors import CiphertextError
from medhe.he.ckks.wire import envelope as ckks_wire
from medhe.he.ckks.wire import serialize as ckks_serialize
from medhe.he.framing import Framing
from medhe.he.paillier import wire as paillier_wire
from medhe.he.tfhe import wire as tfhe_wire

HEADER = struct.Struct("<4sBBI")
FRAMING = Framing("Test", b"MHXX", 3, {1: "keys", 2: "input"})


def message(magic=b"MHXX", version=3, kind=1, value=7) -> bytes:
    return HEADER.pack(magic, version, kind, value)


def test_a_good_header_is_returned_unpacked():
    view, fields = FRAMING.open(message(), 1, HEADER)
    assert fields == (b"MHXX", 3, 1, 7) and bytes(view) == message()
    assert FRAMING.open(bytearray(message()), 1, HEADER)[1][3] == 7
    assert FRAMING.open(memoryview(message()), 1, HEADER)[1][3] == 7


@pytest.mark.parametrize("data, pattern", [
    ("text", "Test keys must be bytes, got str"),
    (message()[:5], r"Test keys is truncated \(5 bytes\)"),
    (message(magic=b"ABCD"), "not a medhe Test message .bad magic"),
    (message(version=9), "wire format 9, this medhe reads 3"),
    (message(kind=2), "expected Test keys but got input"),
    (message(kind=5), "expected Test keys but got kind 5"),
])
def test_each_bad_header_gets_its_own_message(data, pattern):
    with pytest.raises(CiphertextError, match=pattern):
        FRAMING.open(data, 1, HEADER)


@pytest.mark.parametrize("framing", [ckks_wire.FRAMING, ckks_serialize.FRAMING, tfhe_wire.FRAMING,
                                     paillier_wire.FRAMING])
def test_every_scheme_uses_a_distinct_magic_and_names_itself(framing):
    magics = {f.magic for f in (ckks_wire.FRAMING, ckks_serialize.FRAMING, tfhe_wire.FRAMING,
                                paillier_wire.FRAMING)}
    assert len(magics) == 4
    kind = next(iter(framing.kinds))
    with pytest.raises(CiphertextError, match=f"not a medhe {framing.label} message"):
        framing.open(b"XXXX" + bytes(200), kind, HEADER)
