"""Paillier backend: the encrypted linear head equals the plain head on real chest X-rays, and every malformed,
foreign or under-sized input is refused with a medhe error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from phe import paillier
from torch import nn

from medhe.errors import CiphertextError, DataError, PlanError, SecurityError
from medhe.he import client_for, compile_model
from medhe.he.paillier import PaillierClient, affine_map, compile_paillier, encoding, wire
from medhe.models.artifact import ModelArtifact, load_artifact

DATASET = "covid19_radiography_subset"


@pytest.fixture(scope="module")
def artifact():
    return load_artifact("covid-cxr")


@pytest.fixture(scope="module")
def features(artifact, data_dir):
    """Client-stage features of real test-split images (first 2) and the plain torch logits."""
    from medhe.data import load_dataset

    ds = load_dataset(data_dir / DATASET, split="test", channels=1)
    x = torch.from_numpy(artifact.preprocess().batch(ds.images[:2]))
    with torch.no_grad():
        feats = artifact.client_model(x)
        logits = artifact.model(feats)
    return feats.numpy(), logits.double().numpy()


@pytest.fixture(scope="module")
def session(artifact):
    server = compile_model(artifact, "paillier")  # default 3072-bit keys
    client = client_for(server.spec())
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    return server, client, keys


@pytest.fixture(scope="module")
def small_session(artifact):
    """The smallest key accepted (3072 bits since 2048, ~112-bit, is refused): where only the checks matter."""
    server = compile_model(artifact, "paillier", key_bits=3072)
    client = client_for(server.spec())
    client.keygen()
    return server, client, server.load_keys(client.evaluation_keys())


def _reframe(data: bytes, kind: int, mutate) -> bytes:
    """Re-serialize a message after ``mutate(msg) -> msg`` with a valid checksum (a deliberate, consistent forgery)."""
    msg = wire.loads(data, kind)
    width = (len(data) - 36 - 16) // max(len(msg.values), 1)
    return wire.dumps(mutate(msg), width)


@pytest.mark.slow
def test_encrypted_head_equals_plain_head_on_real_images(session, features):
    server, client, keys = session
    feats, plain = features
    for x, ref in zip(feats, plain):
        ct = client.encrypt(x)
        scores = client.decrypt(server.infer(keys, ct))
        exact = server.plain_scores(x)
        bound = server.error_bound(x)
        assert np.all(np.abs(scores - exact) <= bound), (scores, exact, bound)
        assert np.all(bound <= server.public_error_bound())
        assert np.allclose(scores, ref, atol=1e-4)  # float32 torch head vs exact fixed point
        assert scores.argmax() == ref.argmax()


def test_spec_keys_and_sizes(session):
    server, client, keys = session
    spec = server.spec()
    assert spec["scheme"] == "paillier" and spec["params"]["key_bits"] == 3072
    assert spec["input"]["dim"] == server.dim and spec["client_stage"]["arch"] == "mobilenetv2-he"
    ek = client.evaluation_keys()
    assert len(ek) == 36 + 384 + 16  # header + n + digest: the public key only
    assert keys.n.bit_length() == 3072


def test_small_keys_are_refused(artifact, session):
    server, _, _ = session
    with pytest.raises(SecurityError, match="3072"):
        compile_paillier(artifact, key_bits=1024)
    spec = dict(server.spec(), params=dict(server.spec()["params"], key_bits=1024))
    with pytest.raises(SecurityError):
        PaillierClient(spec)
    small, _ = paillier.generate_paillier_keypair(n_length=1024)
    msg = wire.Message(wire.KIND_PUBLIC_KEY, wire.fingerprint(small.n), [small.n])
    with pytest.raises(SecurityError, match="below"):
        server.load_keys(wire.dumps(msg, 128))


def test_tampered_and_foreign_ciphertexts_are_refused(small_session):
    server, client, keys = small_session
    x = np.full(server.dim, 0.5, dtype=np.float32)
    ct = client.encrypt(x)
    flipped = bytearray(ct)
    flipped[100] ^= 1
    with pytest.raises(CiphertextError, match="checksum"):
        server.infer(keys, bytes(flipped))
    with pytest.raises(CiphertextError, match="truncated"):
        server.infer(keys, ct[:-50])
    with pytest.raises(CiphertextError, match="magic"):
        server.infer(keys, b"XXXX" + ct[4:])
    n2 = int(keys.n2)
    for bad in (0, n2 + 5, int(keys.n) * 7):  # out of range, or sharing a factor with n: not a ciphertext
        forged = _reframe(ct, wire.KIND_FEATURES,
                          lambda m, b=bad: wire.Message(m.kind, m.fingerprint, [b] + m.values[1:], m.scale))
        with pytest.raises(CiphertextError, match="not a valid Paillier ciphertext"):
            server.infer(keys, forged)
    with pytest.raises(CiphertextError, match="expected Paillier encrypted features"):
        server.infer(keys, client.evaluation_keys())
    foreign = _reframe(ct, wire.KIND_FEATURES, lambda m: wire.Message(m.kind, bytes(16), m.values, m.scale))
    with pytest.raises(CiphertextError, match="different Paillier key"):
        server.infer(keys, foreign)
    other = client_for(server.spec())
    other.keygen()
    reply = server.infer(keys, ct)
    with pytest.raises(CiphertextError, match="another Paillier key"):
        other.decrypt(reply)
    with pytest.raises(CiphertextError, match="checksum"):
        client.decrypt(reply[:-1] + bytes([reply[-1] ^ 1]))


def test_wrong_vector_length_is_refused(small_session):
    server, client, keys = small_session
    with pytest.raises(DataError, match=f"expected one vector of {server.dim} features"):
        client.encrypt(np.zeros(server.dim - 1, dtype=np.float32))
    with pytest.raises(DataError, match="outside"):
        client.encrypt(np.full(server.dim, 7.0))
    ct = client.encrypt(np.zeros(server.dim, dtype=np.float32))
    short = _reframe(ct, wire.KIND_FEATURES, lambda m: wire.Message(m.kind, m.fingerprint, m.values[:-1], m.scale))
    with pytest.raises(CiphertextError, match=f"expected {server.dim} encrypted features, got {server.dim - 1}"):
        server.infer(keys, short)
    rescaled = _reframe(ct, wire.KIND_FEATURES, lambda m: wire.Message(m.kind, m.fingerprint, m.values, 16))
    with pytest.raises(CiphertextError, match="2\\^-16"):
        server.infer(keys, rescaled)


def test_head_must_be_affine_and_batchnorm_folds():
    head = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.2), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        head[1].running_mean.uniform_(-1, 1)
        head[1].running_var.uniform_(0.5, 2)
    x = torch.randn(5, 4)
    w, b = affine_map(head)
    assert np.allclose(x.double().numpy() @ w.T + b, head(x).detach().double().numpy(), atol=1e-5)
    card = {"name": "t", "task": "binary-class", "labels": ["a", "b"], "preprocessing": {},
            "scheme_options": {"feature_bound": 6.0}}
    with pytest.raises(PlanError, match="not affine"):
        compile_paillier(ModelArtifact(nn.Sequential(nn.Linear(4, 2), nn.ReLU()), card))
    with pytest.raises(PlanError, match="feature_bound"):
        compile_paillier(ModelArtifact(nn.Sequential(nn.Linear(4, 2)), dict(card, scheme_options={})))


def test_fixed_point_bound_and_packing_are_exact_in_integers():
    """The integer pipeline the server runs on ciphertexts, run in the clear: errors stay inside the bound."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(0, 0.5, (3, 40)), rng.normal(0, 1, 3)
    fx = fw = 12  # coarse scales make the rounding error large enough to see
    for _ in range(20):
        x = rng.uniform(0, 6, 40)
        xi, wi = encoding.encode(x, fx), np.array(encoding.encode(w, fw)).reshape(w.shape)
        s = [sum(int(a) * c for a, c in zip(row, xi)) + bi for row, bi in zip(wi, encoding.encode(b, fx + fw))]
        k = encoding.slot_bits_for(wi, encoding.encode(b, fx + fw), 6.0, fx)
        n = (1 << 2047) + 1
        m = encoding.from_residue(encoding.to_residue(encoding.pack(s, k), n), n)
        got = np.array(encoding.unpack(m, 3, k)) / 2.0 ** (fx + fw)
        err = np.abs(got - (w @ x + b))
        assert np.all(err <= encoding.error_bound(w, np.abs(x).sum(), fx, fw))
    with pytest.raises(CiphertextError, match="overflow"):
        encoding.unpack(1 << 40, 2, 16)


def test_extractor_features_respect_the_bound_the_server_plans_for():
    """Slot sizing relies on every feature lying in [0, FEATURE_BOUND]; ensembles concatenate their members."""
    from medhe.models.mobilenet import FEATURE_BOUND, build_mobilenetv2_extractor

    torch.manual_seed(0)
    x = torch.randn(3, 1, 64, 64) * 50  # far outside the normalised range
    for kwargs in ({"feature_dim": 8}, {"feature_dim": 8, "head_channels": 32},
                   {"members": [{"feature_dim": 8}, {"feature_dim": 4, "image_size": 48}]}):
        net = build_mobilenetv2_extractor(in_channels=1, image_size=64, width_mult=0.25, **kwargs).eval()
        with torch.no_grad():
            f = net(x)
        assert f.shape == (3, 12 if "members" in kwargs else 8)
        assert float(f.min()) >= 0.0 and float(f.max()) <= FEATURE_BOUND


def test_rerandomisation_pool_hands_out_each_factor_once(small_session):
    """Pooled Enc(0) factors are removed when taken (never reused), are valid encryptions of zero, and an empty
    pool falls back to computing one inline with the same decrypted result."""
    import copy
    import pickle

    from medhe.he.paillier.pool import RerandomizerPool

    server, client, keys = small_session
    pool = RerandomizerPool(keys.public_key, capacity=3, background=False)
    assert pool.fill() == 3 and len(pool) == 3 and pool.fill() == 0
    pooled = list(pool._items)
    taken = [pool.take() for _ in range(3)]
    assert taken == pooled and len(pool) == 0 and pool.hits == 3
    inline = pool.take()  # empty: computed now
    assert pool.misses == 1 and len(pool) == 0
    factors = taken + [inline]
    assert len({int(f) for f in factors}) == 4  # fresh randomness each time
    for f in factors:
        assert client._secret.raw_decrypt(int(f)) == 0  # each is an encryption of zero
    pool.fill()
    assert len(copy.copy(pool)) == 0 and len(pickle.loads(pickle.dumps(pool))) == 0  # copies never carry factors


def test_replies_are_rerandomised_from_the_pool_and_without_it(artifact, small_session):
    server, client, keys = small_session
    x = np.linspace(0, 6, server.dim)
    ct = client.encrypt(x)
    keys.pool.fill()
    before = len(keys.pool)
    assert before > 0
    warm = [server.infer(keys, ct) for _ in range(2)]
    assert keys.pool.hits >= 2
    cold_server = compile_paillier(artifact, key_bits=3072, pool_size=0)
    cold_keys = cold_server.load_keys(client.evaluation_keys())
    cold = [cold_server.infer(cold_keys, ct) for _ in range(2)]
    assert cold_keys.pool.misses == 2 and len(cold_keys.pool) == 0
    replies = warm + cold
    assert len(set(replies)) == 4  # same request, four different ciphertexts
    scores = [client.decrypt(r) for r in replies]
    for s in scores[1:]:
        assert np.array_equal(s, scores[0])  # decryption is exact: pool and inline paths agree bit for bit
    with pytest.raises(PlanError, match="pool_size"):
        compile_paillier(artifact, key_bits=3072, pool_size=-1)


def test_background_refill_tops_up_the_pool(small_session):
    import time

    from medhe.he.paillier.pool import RerandomizerPool

    _, client, keys = small_session
    pool = RerandomizerPool(keys.public_key, capacity=2)  # background refill on
    deadline = time.monotonic() + 60
    while len(pool) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pool) == 2
    first = pool.take()
    while len(pool) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pool) == 2 and first not in list(pool._items)


def test_test_time_views_keep_features_bounded_and_identity_is_exact():
    from medhe.errors import ArtifactError
    from medhe.models.mobilenet import FEATURE_BOUND, build_mobilenetv2_extractor

    torch.manual_seed(0)
    x = torch.randn(2, 1, 64, 64)
    member = {"feature_dim": 8, "width_mult": 0.25}
    plain = build_mobilenetv2_extractor(in_channels=1, image_size=64, members=[member]).eval()
    tta = build_mobilenetv2_extractor(in_channels=1, image_size=64, members=[member],
                                      views=[{}, {"flip": True}, {"dx": 0.04, "scale": 1.08}]).eval()
    ident = build_mobilenetv2_extractor(in_channels=1, image_size=64, members=[member], views=[{}]).eval()
    tta.load_state_dict(plain.state_dict())
    ident.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(ident(x), plain(x))
        f = tta(x)
    assert f.shape == (2, 8) and float(f.min()) >= 0 and float(f.max()) <= FEATURE_BOUND
    with pytest.raises(ArtifactError, match="view"):
        build_mobilenetv2_extractor(members=[member], views=[{"shear": 1}])


def test_client_encryption_is_phes_and_round_trips(small_session):
    """The CRT shortcut computes exactly phe's raw_encrypt(m, r); fresh r per encryption; decryption round-trips."""
    _, client, _ = small_session
    pk, sk = client._keys()
    rng = np.random.default_rng(1)
    for m in [0, 1, pk.n - 1, pk.n // 2] + [int(v) for v in rng.integers(0, 2**62, 4)]:
        r = pk.get_random_lt_n()
        assert client._encrypt_residue(m, r) == pk.raw_encrypt(m, r_value=r)
        a, b = client._encrypt_residue(m), client._encrypt_residue(m)
        assert a != b  # fresh randomness
        assert sk.raw_decrypt(a) == sk.raw_decrypt(b) == m
    x = np.linspace(0, 6, client.dim)
    c1, c2 = client.encrypt(x), client.encrypt(x)
    v1, v2 = wire.loads(c1, wire.KIND_FEATURES).values, wire.loads(c2, wire.KIND_FEATURES).values
    assert all(u != v for u, v in zip(v1, v2))
    got = [encoding.from_residue(sk.raw_decrypt(c), pk.n) for c in v1]
    assert got == encoding.encode(x, client.feature_bits)


def test_forked_child_never_inherits_pooled_factors(small_session):
    """A fork copies memory: the child must drop the parent's factors, or both could hand out the same one."""
    import os

    from medhe.he.paillier.pool import RerandomizerPool

    _, _, keys = small_session
    pool = RerandomizerPool(keys.public_key, capacity=2, background=False)
    pool.fill()
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        os._exit(0 if len(pool) == 0 and pool.take() is not None and pool.misses == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(pool) == 2  # the parent keeps its own


@pytest.mark.slow
def test_paillier_benchmark_reports_warm_and_empty_pool(data_dir):
    """medhe bench --scheme paillier: both pool states on the same ciphertexts, equal scores, sizes recorded."""
    from medhe.he.paillier.bench import run_paillier_benchmark

    report = run_paillier_benchmark("covid-cxr", images=2, key_bits=3072, data_dir=str(data_dir))
    assert report["images"] == 2 and report["key_bits"] == 3072
    for key in ("client_encrypt_ms", "server_eval_ms_warm_pool", "server_eval_ms_empty_pool", "client_decrypt_ms"):
        assert report[key]["n"] == 2 and report[key]["median"] > 0
    assert report["bytes"]["input_ciphertext"] > 0 and report["bytes"]["evaluation_keys"] > 0
