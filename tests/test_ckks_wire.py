"""Bytes between CKKS client and server: compact, validated, and never carrying the secret key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medhe.errors import CiphertextError, DataError, PlanError
from medhe.he.ckks import CKKSClient, compile_plan, dump_server, load_server
from medhe.he.ckks.wire import envelope, serialize
from medhe.he.ckks.server import CKKSServerModel
from medhe.models.layers import PolyAct


def small_model(seed: int, hidden: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.BatchNorm2d(2).eval(), PolyAct((0.1, 0.5, 0.1)),
                         nn.Flatten(), nn.Linear(72, hidden)).eval()


def session(seed: int = 0, hidden: int = 3):
    model = small_model(seed, hidden)
    server = CKKSServerModel(compile_plan(model, (1, 12, 12)))
    client = CKKSClient(server.spec())
    client.keygen()
    return model, server, client


@pytest.fixture(scope="module")
def pair():
    model, server, client = session()
    keys = server.load_keys(client.evaluation_keys())
    x = np.random.default_rng(1).uniform(-1, 1, (1, 12, 12)).astype(np.float32)
    return model, server, client, keys, x


@pytest.fixture(scope="module")
def other():
    return session(seed=5, hidden=4)


def test_round_trip_matches_plaintext(pair):
    model, server, client, keys, x = pair
    got = client.decrypt(server.infer(keys, client.encrypt(x)))
    want = model(torch.from_numpy(x[None])).detach().double().numpy()[0]
    assert np.abs(got - want).max() < 1e-2


def test_evaluation_keys_hold_only_galois_and_relin_keys(pair):
    _, server, client, _, _ = pair
    data = client.evaluation_keys()
    parts = envelope.unpack(data, envelope.KIND_KEYS, server.plan_id)
    assert len(parts) == 2
    ctx = client.backend.context
    galois = serialize.load_galois_keys(parts[0], ctx)
    serialize.load_relin_keys(parts[1], ctx)
    assert galois.size() == len(server.plan.rotation_steps)
    secret = client.backend.secret_key_bytes_for_tests()
    body = secret[len(secret) // 2: len(secret) // 2 + 64]  # a stretch of secret coefficients
    assert body not in data
    with pytest.raises(CiphertextError):
        serialize.load_public_key(parts[0], ctx)  # nothing in there parses as other key material


def test_client_uploads_are_seeded_and_about_half_the_size(pair):
    """Inputs and keys travel in SEAL's seeded form: the server loads them unchanged, at about half the bytes."""
    model, server, client, keys, x = pair
    be = client.backend
    data = client.encrypt(x)
    parts = envelope.unpack(data, envelope.KIND_INPUT, server.plan_id)
    unseeded = [be.serialize(be.encrypt(be.encode(v, client.input_level, client.input_scale)))
                for v in client.layout(x)]
    assert sum(map(len, parts)) < 0.6 * sum(map(len, unseeded))
    galois, relin = envelope.unpack(client.evaluation_keys(), envelope.KIND_KEYS, server.plan_id)
    plain_galois = serialize.dump_galois_keys(be.galois_keys, be.context)
    assert len(galois) < 0.6 * len(plain_galois)
    from medhe.he.ckks.compiler.keybudget import key_bytes_as_sent  # the planner's key budget uses this estimate
    levels = server.spec()["key_levels"]  # each key is sent trimmed to the highest level the plan uses it at
    expected = sum(key_bytes_as_sent(server.plan.params, lv) for lv in levels["galois"].values())
    expected += key_bytes_as_sent(server.plan.params, levels["relin"])
    assert 0.9 * expected < len(galois) + len(relin) < 1.1 * expected
    whole = len(serialize.dump_galois_keys(be.galois_keys, be.context, be._seeder))
    assert len(galois) < whole if min(levels["galois"].values()) < server.plan.input_level else len(galois) <= whole
    assert client.encrypt(x) != data  # fresh seed and noise every time
    got = client.decrypt(server.infer(keys, data))
    want = model(torch.from_numpy(x[None])).detach().double().numpy()[0]
    assert np.abs(got - want).max() < 1e-2


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "trailing"])
def test_damaged_ciphertexts_are_rejected(pair, damage):
    _, server, client, keys, x = pair
    ct = bytearray(client.encrypt(x))
    if damage == "truncate":
        ct = ct[: len(ct) // 2]
    elif damage == "flip":
        ct[len(ct) // 2] ^= 0x40
    elif damage == "garbage":
        ct = bytearray(np.random.default_rng(0).bytes(5000))
    elif damage == "empty":
        ct = bytearray()
    else:
        ct += b"\0\0"
    with pytest.raises(CiphertextError) as err:
        server.infer(keys, bytes(ct))
    assert "\n" not in str(err.value)


def test_ciphertexts_and_keys_of_another_model_are_rejected(pair, other):
    _, server, client, keys, x = pair
    _, other_server, other_client = other
    with pytest.raises(CiphertextError, match="another model"):
        server.infer(keys, other_client.encrypt(x))
    with pytest.raises(CiphertextError, match="another model"):
        server.load_keys(other_client.evaluation_keys())
    with pytest.raises(CiphertextError, match="another model"):
        other_client.decrypt(server.infer(keys, client.encrypt(x)))


def test_messages_of_the_wrong_kind_are_rejected(pair):
    _, server, client, keys, x = pair
    with pytest.raises(CiphertextError, match="expected CKKS encrypted input"):
        server.infer(keys, client.evaluation_keys())
    with pytest.raises(CiphertextError, match="expected CKKS evaluation keys"):
        server.load_keys(client.encrypt(x))
    with pytest.raises(CiphertextError, match="from load_keys"):
        server.infer(b"not keys", client.encrypt(x))


def test_wrong_ciphertext_count_level_and_missing_keys_are_rejected(pair):
    _, server, client, keys, x = pair
    parts = envelope.unpack(client.encrypt(x), envelope.KIND_INPUT, server.plan_id)
    with pytest.raises(CiphertextError, match="expects"):
        server.infer(keys, envelope.pack(envelope.KIND_INPUT, server.plan_id, parts + parts[:1]))
    low = CKKSClient(server.spec())
    low.keygen()
    low.input_level -= 1
    with pytest.raises(CiphertextError, match="level"):
        server.infer(keys, low.encrypt(x))
    spec = server.spec()
    spec["rotation_steps"] = spec["rotation_steps"][1:]
    partial = CKKSClient(spec)
    partial.keygen()
    with pytest.raises(CiphertextError, match="lack rotations"):
        server.load_keys(partial.evaluation_keys())


def test_keys_trimmed_below_the_plan_are_rejected(pair):
    """A client that trims its keys lower than the plan uses them gets a clear refusal, not a wrong diagnosis."""
    _, server, _, _, _ = pair
    spec = server.spec()
    levels = spec["key_levels"]
    step = max(levels["galois"], key=lambda s: levels["galois"][s])
    assert levels["galois"][step] > 0
    low = {**levels, "galois": {**levels["galois"], step: 0}}
    client = CKKSClient({**spec, "key_levels": low})
    client.keygen()
    with pytest.raises(CiphertextError, match="trimmed below what this model needs"):
        server.load_keys(client.evaluation_keys())


@pytest.mark.parametrize("levels", [[1, 2], {"galois": {"1": 99}, "relin": 0}, {"galois": {}, "relin": "x"}])
def test_malformed_key_levels_in_a_spec_are_a_clear_error(pair, levels):
    _, server, _, _, _ = pair
    with pytest.raises(PlanError, match="malformed"):
        CKKSClient({**server.spec(), "key_levels": levels})


def test_keys_from_foreign_parameters_are_rejected(pair):
    _, server, _, _, _ = pair
    spec = server.spec()
    foreign = CKKSClient({**spec, "params": {"poly_degree": 8192, "prime_bits": [40, 30, 30, 30, 50],
                                             "scale_bits": 30}})
    foreign.keygen()
    with pytest.raises(CiphertextError):
        server.load_keys(foreign.evaluation_keys())


def test_client_input_is_validated(pair):
    _, _, client, _, _ = pair
    with pytest.raises(DataError, match="expects"):
        client.encrypt(np.zeros((1, 10, 10)))
    with pytest.raises(DataError, match="NaN"):
        client.encrypt(np.full((1, 12, 12), np.nan))


def test_compiled_model_round_trips_through_bytes(pair):
    model, server, client, _, x = pair
    data = dump_server(server)
    loaded = load_server(data)
    assert loaded.spec() == server.spec()
    keys = loaded.load_keys(client.evaluation_keys())
    got = client.decrypt(loaded.infer(keys, client.encrypt(x)))
    want = model(torch.from_numpy(x[None])).detach().double().numpy()[0]
    assert np.abs(got - want).max() < 1e-2


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic"])
def test_damaged_compiled_model_is_refused(pair, damage):
    data = bytearray(dump_server(pair[1]))
    if damage == "flip":
        data[len(data) // 3] ^= 0x10
    elif damage == "truncate":
        data = data[:-100]
    else:
        data[:4] = b"XXXX"
    with pytest.raises(PlanError, match="compile the model again"):
        load_server(bytes(data))
