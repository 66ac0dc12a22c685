"""The stream check of uploads: valid messages pass however they are chunked, and each kind of wrong first bytes
is refused as soon as the bytes that show it have arrived (real keys and ciphertexts, no server)."""

import numpy as np
import pytest

from medhe.he.scheme import client_for, compile_model
from medhe.models.artifact import load_artifact
from medhe.service.errors import ServiceError
from medhe.service.limits import rules_for
from medhe.service.upload import StreamCheck


@pytest.fixture(scope="module")
def ckks():
    model = compile_model(load_artifact("pneumoniamnist"), "ckks")
    client = client_for(model.spec())
    client.keygen()
    return rules_for(model), client.evaluation_keys(), client.encrypt(np.zeros(model.spec()["input"]["shape"]))


def feed(rules, kind, data, step):
    check = StreamCheck(rules, kind, kind)
    for i in range(0, len(data), step):
        check.feed(data[i:i + step])
    check.finish()
    return check


def refused(rules, kind, data, status=422):
    with pytest.raises(ServiceError) as err:
        feed(rules, kind, data, 4096)
    assert err.value.status == status, err.value
    return str(err.value)


def test_valid_messages_pass_in_any_chunking(ckks):
    rules, keys, ct = ckks
    for step in (997, 65536, len(keys)):
        feed(rules, "keys", keys, step)
    for step in (1, 13, 65536):
        feed(rules, "input", ct, step)
    assert len(keys) < rules["key_bytes"] and len(ct) < rules["input_bytes"]


def test_wrong_first_bytes_are_refused(ckks):
    rules, keys, ct = ckks
    assert "envelope magic" in refused(rules, "keys", b"\0" * 70000)
    assert "another model" in refused(rules, "keys", keys[:6] + b"\1" * 16 + keys[22:])
    assert "kind" in refused(rules, "keys", ct)  # an input sent as keys
    assert "parts" in refused(rules, "input", ct[:22] + b"\x03\x00" + ct[24:])
    big = keys[:24] + (1 << 31).to_bytes(4, "little") + keys[28:]
    assert "declares" in refused(rules, "keys", big, 413)
    frame = 24 + 4
    assert "fingerprint" in refused(rules, "keys", keys[:frame + 8] + b"\xaa" * 16 + keys[frame + 24:])
    assert "after its last part" in refused(rules, "input", ct + b"\0")
    assert "truncated" in refused(rules, "input", ct[:-1])


def test_paillier_header_bounds_the_key_size():
    from medhe.he.paillier import wire

    rules = {"scheme": "paillier", "max_key_bits": 4096, "dim": 32}
    n = (1 << 8191) | 1
    msg = wire.dumps(wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(n), [n]), 1024)
    with pytest.raises(ServiceError, match="4096-bit limit") as err:
        feed(rules, "keys", msg, 10)
    assert err.value.code == "unsupported_key_size"
    n = (1 << 3071) | 1
    feed(rules, "keys", wire.dumps(wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(n), [n]), 384), 10)
    with pytest.raises(ServiceError, match="bytes past"):
        feed(rules, "keys", wire.dumps(wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(n), [n]), 384) + b"x", 50)


def test_hybrid_keys_are_read_as_key_envelope_2():
    """Key envelope version 2 (docs/protocol.md 4.12): an index part, then digit frames of the key context; the
    check used to refuse every hybrid key set ("uses envelope version 2; this server reads 1")."""
    import struct

    from medhe.he.ckks.wire import envelope

    model = compile_model(load_artifact("pneumoniamnist"), "ckks", backend="native", key_switching="hybrid")
    client = client_for(model.spec())
    client.keygen()
    rules, keys = rules_for(model), client.evaluation_keys()
    for step in (997, 65536, len(keys)):
        feed(rules, "keys", keys, step)
    assert len(keys) <= rules["key_bytes"]
    plan_id = model.spec()["plan_id"]
    assert "key envelope version 2 (hybrid keys)" in refused(rules, "keys", envelope.pack(
        envelope.KIND_KEYS, plan_id, [b"", b""]))  # a version-1 client's keys
    parts = envelope.unpack(keys, envelope.KIND_KEYS, plan_id, version=2)
    def repack(new_parts):
        return envelope.pack(envelope.KIND_KEYS, plan_id, new_parts, version=2)

    too_many = rules["key_max_parts"]
    assert "digit frames" in refused(rules, "keys", repack([parts[0]] + [parts[1]] * too_many))
    frame = bytearray(parts[1])
    frame[8:24] = bytes(16)  # the digit frame's parameter fingerprint
    assert "fingerprint" in refused(rules, "keys", repack([parts[0], bytes(frame), *parts[2:]]))
    assert "index" in refused(rules, "keys", repack([b"\0\0", *parts[1:]]))
    big_index = struct.pack("<I", 1) + bytes(rules["index_part_bytes"])
    assert "part 0 declares" in refused(rules, "keys", repack([big_index, *parts[1:]]), status=413)
