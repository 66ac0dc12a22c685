"""CKKS batch mode (one image per slot): the kernel against SEAL bit for bit, real encrypted batches against
plaintext, and the bad-input paths."""

import json

import numpy as np
import pytest
import seal
import torch
from torch import nn

from medhe.errors import CiphertextError, DataError, OutOfRangeError, PlanError
from medhe.he.ckks.batch import rns
from medhe.he.ckks.batch.client import CKKSBatchClient
from medhe.he.ckks.batch.compiler import compile_batch_plan
from medhe.he.ckks.batch.server import CKKSBatchServer, batch_server_from_model
from medhe.he.ckks.backends.seal import seal_context
from medhe.he.ckks.compiler.params import CKKSParams, data_primes
from medhe.he.ckks.wire import envelope as wire
from medhe.models.layers import PolyAct, Residual

_batch = pytest.importorskip("medhe.he.ckks._batch", reason="batch kernel not built (python setup.py build_ext)")


# ---------------------------------------------------------------------------------------------------------------
# the kernel is SEAL's arithmetic


@pytest.fixture(scope="module")
def seal_tools():
    params = CKKSParams(8192, (30,) * 6 + (38,), 30)
    ctx = seal_context(params)
    gen = seal.KeyGenerator(ctx)
    sk = gen.secret_key()
    return (params, ctx, seal.Encryptor(ctx, sk), seal.Evaluator(ctx), seal.CKKSEncoder(ctx),
            seal.Decryptor(ctx, sk))


def test_kernel_matches_seal_bit_for_bit(seal_tools):
    params, ctx, enc, ev, encoder, _ = seal_tools
    primes = data_primes(params)
    rng = np.random.default_rng(1)
    scale = 2.0 ** 20
    cts = [enc.encrypt_symmetric(encoder.encode(rng.uniform(-1, 1, 4096), scale)) for _ in range(3)]
    arr = np.stack([rns.to_array(c) for c in cts])
    weights = np.array([[3, -7, 0], [-(2 ** 30) + 1, 5, 2 ** 30 - 1]], dtype=np.int64)  # extremes of the range
    bias = [11 * 2 ** 20, -(2 ** 40) - 3]  # exact integers at the output scale
    beta, c = 12345, -(2 ** 41) + 17
    seg = _batch.Segment(primes, 8192, [(3, 2), (2, 2), (2, 3)])
    mat_indptr, mat_idx, mat_w = [0], [], []
    for row in weights:
        nz = np.flatnonzero(row)
        mat_idx += list(nz)
        mat_w += list(row[nz])
        mat_indptr.append(len(mat_idx))
    seg.add_mac(0, 1, np.array(mat_indptr), np.array(mat_idx), np.array(mat_w),
                np.array([[b % q for q in primes] for b in bias], dtype=np.uint64).reshape(-1))
    seg.add_poly2(1, 2, -1, rns.residues(beta, primes), rns.residues(c, primes))
    got = seg.run(arr, 2, 2, 64)
    assert np.array_equal(seg.run(arr.astype(np.uint32), 2, 1, 32), got)  # uint32 input, other threads/chunk

    def const(value: int, at_scale: float) -> seal.Plaintext:
        # SEAL encodes round(value / at_scale * at_scale) = value exactly (|value| < 2^53, power-of-two scales)
        return encoder.encode(float(value) / at_scale, at_scale)

    for o, row in enumerate(weights):
        acc = None
        for i, w in enumerate(row):
            if w == 0:
                continue
            term = ev.multiply_plain(cts[i], const(int(w), 1.0))
            acc = term if acc is None else ev.add(acc, term)
        acc = ev.add_plain(acc, const(bias[o], scale))
        v = ev.add_plain(ev.negate(acc), const(beta, scale))
        sq = ev.multiply(acc, v)
        sq = ev.add_plain(sq, const(c, scale * scale))
        assert np.array_equal(got[o], rns.to_array(sq)), f"output {o} differs from SEAL"


def test_kernel_refuses_bad_arguments():
    primes = [1073479681]
    with pytest.raises(ValueError, match="2\\^31"):
        _batch.Segment([(1 << 31) + 11], 8, [(1, 2)])
    seg = _batch.Segment(primes, 8, [(2, 2), (1, 2)])
    with pytest.raises(ValueError, match="index out of range"):
        seg.add_mac(0, 1, np.array([0, 1]), np.array([5]), np.array([1]), np.zeros(0, np.uint64))
    with pytest.raises(ValueError, match="31 bits"):
        seg.add_mac(0, 1, np.array([0, 1]), np.array([0]), np.array([2 ** 40]), np.zeros(0, np.uint64))
    seg.add_mac(0, 1, np.array([0, 2]), np.array([0, 1]), np.array([1, 1]), np.zeros(0, np.uint64))
    with pytest.raises(ValueError, match="input must be"):
        seg.run(np.zeros((3, 2, 1, 8), np.uint64), 1, 1, 8)
    with pytest.raises(ValueError, match="not reduced"):
        seg.run(np.full((2, 2, 1, 8), primes[0], np.uint64), 1, 1, 8)


def test_rns_round_trip_is_byte_identical(seal_tools):
    _, ctx, enc, _, encoder, _ = seal_tools
    ct = enc.encrypt_symmetric(encoder.encode(np.linspace(-1, 1, 4096), 2.0 ** 30))
    again = rns.from_array(rns.to_array(ct), ct.parms_id(), ct.scale(), ctx, rns.seal_version(ctx))
    assert again.to_string() == ct.to_string()


# ---------------------------------------------------------------------------------------------------------------
# real encrypted batches


def tiny_model(seed: int = 0) -> tuple[nn.Sequential, np.ndarray]:
    """conv -> square activation -> linear -> activation -> linear on 1x4x4 inputs, ranges recorded on data."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), PolyAct((0.1, 0.5, 0.2)), nn.Flatten(),
                          nn.Linear(48, 6), PolyAct((-0.08, 0.6, -0.1)), nn.Linear(6, 3)).eval()
    x = np.random.default_rng(seed).uniform(-1, 1, (64, 1, 4, 4)).astype(np.float32)
    with torch.no_grad():
        model(torch.as_tensor(x))  # records the activations' input ranges
    return model, x


def _plain(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


@pytest.fixture(scope="module")
def tiny_session():
    model, x = tiny_model()
    server = batch_server_from_model(model, (1, 4, 4), labels=["a", "b", "c"])
    client = CKKSBatchClient(json.loads(json.dumps(server.spec())))  # the spec travels as JSON
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    return model, x, server, client, keys


def test_batch_matches_plaintext_and_pads_the_last_batch(tiny_session):
    model, x, server, client, keys = tiny_session
    n = server.batch_size + 37  # two ciphertext batches, the second one padded
    xs = x[np.arange(n) % len(x)] * np.linspace(0.5, 1.0, n, dtype=np.float32)[:, None, None, None]
    uploads = client.encrypt_batch(xs)
    assert len(uploads) == 2
    results = [server.infer_batch(keys, u) for u in uploads]
    got = client.decrypt_batch(results, n)
    assert got.shape == (n, 3)
    want = _plain(model, xs)
    assert np.max(np.abs(got - want)) < 1e-3
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_batch_spec_has_no_rotations_and_only_relinearization_keys(tiny_session):
    _, _, server, client, _ = tiny_session
    spec = server.spec()
    assert spec["rotation_steps"] == [] and spec["key_levels"]["galois"] == {}
    assert spec["params"]["poly_degree"] == 8192 and sum(spec["params"]["prime_bits"]) <= 218
    assert len(wire.unpack(client.evaluation_keys(), wire.KIND_KEYS, server.plan_id)) == 1
    assert "weight" not in json.dumps(spec)


def test_batch_bad_inputs(tiny_session):
    model, x, server, client, keys = tiny_session
    upload = client.encrypt_batch(x[:3])[0]
    with pytest.raises(CiphertextError, match="truncated"):
        server.infer_batch(keys, upload[:-10])
    parts = wire.unpack(upload, wire.KIND_INPUT, server.plan_id)
    with pytest.raises(CiphertextError, match="expects 16"):
        server.infer_batch(keys, wire.pack(wire.KIND_INPUT, server.plan_id, parts[:-1]))
    with pytest.raises(CiphertextError, match="another model"):
        server.infer_batch(keys, wire.pack(wire.KIND_INPUT, "00" * 16, parts))
    with pytest.raises(CiphertextError):
        server.load_keys(upload)
    with pytest.raises(DataError, match="expects"):
        client.encrypt_batch(np.zeros((2, 1, 5, 5)))
    bad = x[:3].copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="image 1"):
        client.encrypt_batch(bad)
    with pytest.raises(PlanError, match="batch spec"):
        CKKSBatchClient({"scheme": "ckks", "params": server.spec()["params"]})
    fresh = CKKSBatchClient(server.spec())
    with pytest.raises(PlanError, match="keygen"):
        fresh.encrypt_batch(x[:1])


def test_batch_out_of_range_inputs_and_results_are_refused(tiny_session):
    model, x, server, client, keys = tiny_session
    with pytest.raises(DataError, match="image 2 has values up to"):
        client.encrypt_batch(np.concatenate([x[:2], x[:1] * 400.0]))
    # A result beyond the plan's range (here: a server that ignored the plan's scale) spoils the whole batch.
    out = server.evaluate(keys, server.load_inputs(client.encrypt_batch(x[:2])[0]))
    wild = CKKSBatchServer(server.plan, labels=server.labels)
    wild.plan = type(server.plan)(**{**server.plan.__dict__, "output_scale": server.plan.output_scale / 2 ** 12})
    with pytest.raises(OutOfRangeError, match="none of its results"):
        client.decrypt_batch([wild.dump_outputs(out)])


def test_batch_refuses_models_it_cannot_run():
    body = nn.Sequential(nn.Linear(16, 16), PolyAct((0.1, 0.5, 0.0)))
    model = nn.Sequential(nn.Flatten(), Residual(body), nn.Linear(16, 2)).eval()
    with torch.no_grad():
        model(torch.zeros(4, 1, 4, 4))
    with pytest.raises(PlanError, match="one image at a time"):
        compile_batch_plan(model, (1, 4, 4))


@pytest.mark.slow
def test_batch_pneumoniamnist_real_images(data_dir):
    from medhe.he.ckks.batch.server import compile_ckks_batch
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs, predict_logits

    artifact = load_artifact("pneumoniamnist")
    with np.load(data_dir / "pneumoniamnist.npz") as d:
        images = d["test_images"][:40]
    x = model_inputs(artifact, images)
    server = compile_ckks_batch(artifact)
    assert isinstance(server, CKKSBatchServer)
    client = CKKSBatchClient(server.spec())
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    got = client.decrypt_batch([server.infer_batch(keys, u) for u in client.encrypt_batch(x)], len(x))
    want = predict_logits(artifact.model, x)
    assert np.max(np.abs(got - want)) < 1e-2
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_native_and_seal_boundaries_agree_bit_for_bit(tiny_session):
    pytest.importorskip("medhe.he.ckks._runtime", reason="native runtime not built")
    from medhe.he.ckks.batch.runtime import NativeBoundary, SealBoundary

    model, x, server, client, keys = tiny_session
    arr = server.load_inputs(client.encrypt_batch(x[:5])[0])
    seg = server.plan.segments[0]
    mid = server.kernels[0].run(arr, seg.output, 2, 64)
    a = SealBoundary(server.plan, keys)(mid, seg)
    b = NativeBoundary(server.plan, keys)(mid, seg)
    assert seg.relin and seg.rescales >= 1 and np.array_equal(a, b)


def test_kernel_lazy_reduction_over_many_large_terms():
    """40 terms of |w| ~ 2^30 force a reduction every few terms; the sum must still be exact modulo each prime."""
    primes = [1073479681, 1072496641]
    rng = np.random.default_rng(7)
    n_in, degree = 40, 128
    x = np.stack([rng.integers(0, q, size=(n_in, 2, degree), dtype=np.uint64) for q in primes], axis=2)
    w = rng.choice([-(2 ** 30) + 1, 2 ** 30 - 1, -12345, 3], size=(2, n_in)).astype(np.int64)
    seg = _batch.Segment(primes, degree, [(n_in, 2), (2, 2)])
    seg.add_mac(0, 1, np.array([0, n_in, 2 * n_in]), np.tile(np.arange(n_in), 2), w.reshape(-1),
                np.zeros(0, np.uint64))
    got = seg.run(x, 1, 2, 64)
    for li, q in enumerate(primes):
        want = np.zeros((2, 2, degree), dtype=np.uint64)
        for o in range(2):
            for i in range(n_in):
                want[o] = (want[o] + np.uint64(int(w[o, i]) % q) * x[i, :, li]) % np.uint64(q)
        assert np.array_equal(got[:, :, li], want)


def test_simulated_plan_tracks_plaintext_and_encryption_tracks_simulation(tiny_session):
    from medhe.he.ckks.batch.simulate import simulate

    model, x, server, client, keys = tiny_session
    sim = simulate(server.plan, x)
    plain = _plain(model, x)
    assert np.max(np.abs(sim - plain)) < 1e-4  # quantization of weights and constants only
    enc = client.decrypt_batch([server.infer_batch(keys, client.encrypt_batch(x)[0])], len(x))
    assert np.max(np.abs(enc - sim)) < 1e-3  # CKKS noise on top


def test_batch_refuses_models_over_the_memory_budget(monkeypatch):
    model, _ = tiny_model()
    plan = compile_batch_plan(model, (1, 4, 4))
    monkeypatch.setenv("MEDHE_BATCH_MEMORY", str(plan.memory_bytes() / 2 ** 30 / 2))
    with pytest.raises(PlanError, match="server memory per batch"):
        CKKSBatchServer(plan)
    monkeypatch.setenv("MEDHE_BATCH_MEMORY", "lots")
    with pytest.raises(PlanError, match="GiB"):
        CKKSBatchServer(plan)


def test_cli_batch_flags_are_ckks_only(capsys):
    from medhe.cli import main as medhe_main

    assert medhe_main(["evaluate", "--model", "pneumoniamnist", "--scheme", "plain", "--batch"]) == 2
    assert "--scheme ckks only" in capsys.readouterr().err
    assert medhe_main(["bench", "--scheme", "tfhe", "--batch"]) == 2
    assert "--scheme ckks only" in capsys.readouterr().err
