"""TFHE backend on a tiny QAT model: compile, simulate, execute with real encryption, and clear errors.

The model is small (8x8 image pooled to 16 inputs, 4 hidden neurons) so that compilation, key generation and
execution stay within seconds; keys are generated once per test session.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medhe.errors import CiphertextError, DataError, PlanError
from medhe.he import client_for, compile_model
from medhe.he.tfhe import TFHEClient, TFHEServerModel, compile_tfhe, integer_model, simulate, wire
from medhe.models.artifact import ModelArtifact
from medhe.models.quant import build_qfcnn

CARD = {"name": "tiny-qfcnn", "arch": "qfcnn", "task": "binary-class", "labels": ["a", "b"],
        "preprocessing": {"channels": 1, "size": 8, "crop": None, "mean": 0.5, "std": 0.5}}


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((rng.integers(0, 256, (n, 1, 8, 8)) / 255 - 0.5) / 0.5).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_artifact() -> ModelArtifact:
    torch.manual_seed(0)
    model = build_qfcnn(in_channels=1, num_outputs=2, image_size=8, hidden=4, quant_bits=3, input_bits=2,
                        act_bits=2, acc_bits=4, pool=2)
    with torch.no_grad():  # spread the tiny network's outputs so predictions are not all one class
        model.acts[0].clip.fill_(1.0)
    return ModelArtifact(model=model.eval(), card=dict(CARD, arch_kwargs={}))


@pytest.fixture(scope="session")
def server(tiny_artifact) -> TFHEServerModel:
    return compile_tfhe(tiny_artifact, fhe="execute")  # default: exact rounding, compressed keys and inputs


@pytest.fixture(scope="session")
def session(server):
    """(client, loaded evaluation keys, raw key bytes): one key generation for the whole test session."""
    client = TFHEClient(server.spec())
    client.keygen()
    raw = client.evaluation_keys()
    return client, server.load_keys(raw), raw


def test_compile_reports_params(server):
    p = server.params
    assert p["security_bits"] >= 128
    assert 0 < p["p_error"] < 1e-3
    assert p["pbs_count"] >= 4  # one table lookup per hidden neuron (exact rounding adds its own)
    assert p["accumulator_bits"][0] >= p["tlu_input_bits"][0]
    assert p["bootstrap_key_bytes"] > 0 and p["keyswitch_key_bytes"] > 0
    assert p["input_size"] == 16


def test_default_rounding_is_exact_and_uploads_are_compressed(tiny_artifact, server, session):
    client, _keys, raw = session
    assert server.params["rounding"] == "exact"
    plain = compile_tfhe(tiny_artifact, fhe="execute", compress_evaluation_keys=False,
                         compress_input_ciphertexts=False)
    plain_client = TFHEClient(plain.spec())
    plain_client.keygen()
    x = _images(1)[0]
    assert len(client.encrypt(x)) * 10 < len(plain_client.encrypt(x))  # seeded LWE inputs
    assert np.array_equal(plain.simulate(plain.integer.quantize_input(_images(8))),
                          server.simulate(server.integer.quantize_input(_images(8))))


def test_simulation_is_bit_exact_with_integer_reference(server):
    q = server.integer.quantize_input(_images(40))
    assert np.array_equal(server.simulate(q), server.reference(q))
    logits = simulate(server, _images(5))
    assert logits.shape == (5, 2)


def test_simulate_only_mode(tiny_artifact):
    sim = compile_model(tiny_artifact, "tfhe", fhe="simulate", exactness="exact")  # through the generic registry
    assert isinstance(sim, TFHEServerModel)
    q = sim.integer.quantize_input(_images(10, seed=1))
    assert np.array_equal(sim.simulate(q), sim.reference(q))
    with pytest.raises(PlanError, match="fhe='execute'"):
        sim.spec()


@pytest.mark.slow
def test_execute_matches_simulation(server, session):
    client, keys, raw = session
    images = _images(4, seed=2)
    sim = server.simulate(server.integer.quantize_input(images))
    for x, expected in zip(images, sim):
        out = server.infer(keys, client.encrypt(x))
        assert np.array_equal(client.decrypt_raw(out), expected)
        assert np.allclose(client.decrypt(out), expected * server.integer.output_scale)
    assert len(raw) > 1000


def test_generic_interface_and_json_spec(tiny_artifact, server):
    import json

    spec = json.loads(json.dumps(server.spec()))
    assert spec["scheme"] == "tfhe" and spec["params"]["security_bits"] >= 128
    assert isinstance(client_for(spec), TFHEClient)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((1, 4, 4), np.float32), "shape"),
    (np.zeros((8, 8), np.float32), "shape"),
    (np.full((1, 8, 8), 1.5, np.float32), "quantized for"),
    (np.full((1, 8, 8), -3.0, np.float32), "quantized for"),
    (np.full((1, 8, 8), np.nan, np.float32), "NaN"),
])
def test_client_rejects_bad_inputs(server, bad, match):
    client = TFHEClient(server.spec())  # inputs are checked before any key is needed
    with pytest.raises(DataError, match=match):
        client.encrypt(bad)


@pytest.mark.slow
def test_server_rejects_malformed_bytes(server, session):
    client, keys, raw = session
    ct = client.encrypt(_images(1)[0])
    with pytest.raises(CiphertextError, match="truncated"):
        server.infer(keys, ct[:10])
    with pytest.raises(CiphertextError, match="checksum"):
        server.infer(keys, ct[:-1] + bytes([ct[-1] ^ 1]))
    with pytest.raises(CiphertextError, match="which says"):
        server.infer(keys, ct[:-5])
    with pytest.raises(CiphertextError, match="expected TFHE input"):
        server.infer(keys, raw[:2000])
    with pytest.raises(CiphertextError, match="another circuit"):
        server.infer(keys, wire.pack(wire.KIND_INPUT, b"\0" * 16, b"x"))
    with pytest.raises(CiphertextError, match="rejected"):
        server.infer(keys, wire.pack(wire.KIND_INPUT, server.fingerprint, b"garbage"))
    with pytest.raises(CiphertextError, match="magic"):
        server.load_keys(b"NOPE" + raw[4:64])
    with pytest.raises(CiphertextError, match="do not deserialize"):
        server.load_keys(wire.pack(wire.KIND_KEYS, server.fingerprint, b"not keys"))
    with pytest.raises(CiphertextError, match="load_keys"):
        server.infer(object(), ct)


def test_client_needs_keys_and_valid_spec(server):
    client = TFHEClient(server.spec())
    with pytest.raises(CiphertextError, match="keygen"):
        client.encrypt(_images(1)[0])
    with pytest.raises(PlanError, match="TFHE spec"):
        TFHEClient({"scheme": "ckks"})
    broken = dict(server.spec(), client_specs="!!not base64!!")
    with pytest.raises(PlanError, match="corrupted"):
        TFHEClient(broken)


def test_non_qat_model_is_refused():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(PlanError, match="qfcnn"):
        integer_model(ModelArtifact(model=net, card=dict(CARD, arch_kwargs={})))
    with pytest.raises(PlanError, match="--fhe"):
        compile_tfhe(ModelArtifact(model=net, card=dict(CARD, arch_kwargs={})), fhe="gpu")


def test_evaluate_tfhe_fills_report_in_simulation(tiny_artifact, server):
    from medhe.he.tfhe import evaluate_tfhe

    images = _images(12, seed=4)
    labels = np.arange(12).reshape(-1, 1) % 2
    report = evaluate_tfhe(tiny_artifact, images, labels, fhe="simulate", server=server)
    for key in ("plain_float", "quantized", "simulated"):
        assert set(report[key]) >= {"acc", "auc", "f1"}
    assert report["simulated_vs_quantized"]["bit_exact"] == 1.0  # exact rounding: simulation is bit-exact
    assert report["params"]["security_bits"] >= 128 and "p_error" in report["params"]
    with pytest.raises(DataError, match="labels"):
        evaluate_tfhe(tiny_artifact, images, labels[:5], fhe="simulate", server=server)


def test_bench_baseline_is_the_literal_unrounded_fcnn():
    """medhe bench --scheme tfhe races the issue's baseline: 784-64-2, 4-bit, no accumulator rounding at all."""
    from medhe.he.tfhe.bench import BASELINE, baseline_server

    calibration = ((np.random.default_rng(0).integers(0, 256, (20, 1, 28, 28)) / 255 - 0.5) / 0.5).astype(np.float32)
    server = baseline_server(calibration)
    p = server.params
    assert BASELINE["acc_bits"] is None and p["lsbs_rounded"] == [0]
    assert p["input_bits"] == 4 and p["input_size"] == 784 and p["pool"] == 1
    assert p["pbs_count"] == 64  # one lookup per hidden neuron, none spent on rounding
    assert p["max_bit_width"] >= 10  # whole accumulators (widths from the calibration images) go into the lookups
    w = server.integer.layers
    assert [layer.weight.shape for layer in w] == [(64, 784), (2, 64)]
    assert max(int(np.abs(layer.weight).max()) for layer in w) <= 7 and int(w[0].table.max()) <= 15


@pytest.mark.slow
def test_encrypted_loop_hooks_and_bench_pipeline(server):
    """The one encrypt -> infer -> decrypt loop (run_encrypted) drives reports and benchmarks through its hooks."""
    from contextlib import contextmanager

    from medhe.he.evaluate import run_encrypted
    from medhe.he.tfhe.bench import _pipeline

    images = _images(3, seed=5)
    seen, stages, keys = [], [], []

    @contextmanager
    def stage(name):
        stages.append(name)
        yield

    run = run_encrypted(server, images, progress=False, on_image=seen.append, stage=stage, on_keys=keys.append)
    assert [r.index for r in seen] == [0, 1, 2] and run["images"] == seen
    assert stages == ["key generation"] + [f"image {i}/3: server eval" for i in (1, 2, 3)]
    assert len(keys) == 1 and keys[0]["evaluation_keys"] == run["bytes"]["evaluation_keys"] > 0
    assert all(r.eval_ms > 0 and r.eval_cpu_ms > 0 and r.input_bytes > 0 for r in seen)
    expected = server.simulate(server.integer.quantize_input(images)) * server.integer.output_scale
    assert np.allclose(run["logits"], expected)

    report = _pipeline("tiny", server, 0.0, images, progress=False)
    assert report["executed_equals_simulated_bits"] == 3 and report["n_images"] == 3
    assert len(report["load_average_per_image"]) == 3 and report["keygen_s"] > 0
    assert set(report["latency_ms"]) == {"encrypt", "eval", "eval_cpu", "decrypt"}
