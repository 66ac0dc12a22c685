"""CKKS engine end to end on real PneumoniaMNIST images: compile, keys, encrypt, evaluate, decrypt.

The model is hecnn-shaped (the default architecture) with random weights and non-trivial BatchNorm statistics;
every encrypted logit is compared with the torch forward pass of the very same model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medhe.he import client_for, compile_model
from medhe.he.ckks import CKKSClient, compile_plan, layer_errors
from medhe.he.ckks.server import CKKSServerModel
from medhe.he.ckks.compiler.trace import run_plain, trace
from medhe.models.artifact import ModelArtifact
from medhe.models.layers import PolyAct


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


def hecnn_like(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 5, 2, 2), nn.BatchNorm2d(8), PolyAct((0.1, 0.5, 0.2)), nn.Flatten(),
                          nn.Linear(1568, 32), nn.BatchNorm1d(32), PolyAct((0.08, 0.6, -0.1)), nn.Linear(32, 2))
    _randomize_bn(model, seed)
    return model.eval()


def pneumonia_images(data_dir, n: int) -> np.ndarray:
    with np.load(data_dir / "pneumoniamnist.npz") as d:
        images = d["test_images"][:n]
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]


@pytest.fixture(scope="module")
def hecnn_session():
    model = hecnn_like()
    card = {"name": "hecnn-test", "task": "binary-class", "labels": ["normal", "pneumonia"],
            "preprocessing": {"channels": 1, "size": 28, "mean": 0.5, "std": 0.5}}
    server = compile_model(ModelArtifact(model=model, card=card), scheme="ckks")
    spec = json.loads(json.dumps(server.spec()))  # the spec travels as JSON
    client = client_for(spec)
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    return model, server, client, keys


def test_trace_folds_bn_and_matches_torch():
    model = hecnn_like(1)
    graph = trace(model, (1, 28, 28))
    assert [n.op for n in graph.nodes] == ["input", "linear", "poly", "linear", "poly", "linear"]
    x = torch.randn(1, 1, 28, 28)
    expected = model(x).detach().double().numpy()[0]
    assert np.abs(run_plain(graph, x.numpy()[0])[-1] - expected).max() < 1e-5


def test_hecnn_plan_fits_the_measured_design():
    server = CKKSServerModel(compile_plan(hecnn_like(), (1, 28, 28)))
    summary = server.plan.summary()
    assert summary["poly_degree"] == 8192 and summary["depth"] == 5
    assert sum(summary["prime_bits"]) <= 218
    assert summary["rotation_keys"] <= 16  # Galois keys only for the steps the plan uses
    spec = server.spec()
    assert spec["scheme"] == "ckks" and spec["rotation_steps"] == server.plan.rotation_steps
    json.dumps(spec)


def test_hecnn_encrypted_logits_match_plaintext(hecnn_session, data_dir):
    model, server, client, keys = hecnn_session
    images = pneumonia_images(data_dir, 3)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).double().numpy()
    for x, want in zip(images, expected):
        out = server.infer(keys, client.encrypt(x))
        got = client.decrypt(out)
        assert got.shape == (2,)
        assert np.abs(got - want).max() < 1e-2
        assert got.argmax() == want.argmax()
        probs = client.probabilities(got)
        assert probs.sum() == pytest.approx(1.0)


def test_sizes_as_sent_stay_within_budget(hecnn_session, data_dir):
    _, server, client, _ = hecnn_session
    ct = client.encrypt(pneumonia_images(data_dir, 1)[0])
    assert len(ct) <= 8_000_000
    assert len(client.evaluation_keys()) <= 48_000_000


def test_results_outside_the_plans_range_are_refused(hecnn_session, data_dir):
    """The spec publishes the |output| the chain was sized for; beyond it a CKKS result may have wrapped around
    modulo the first prime, so the client refuses to report it (OutOfRangeError) instead of a wrong diagnosis."""
    from medhe.errors import OutOfRangeError

    _, server, client, keys = hecnn_session
    spec = json.loads(json.dumps(server.spec()))
    bound = spec["output"]["bound"]
    out = server.infer(keys, client.encrypt(pneumonia_images(data_dir, 1)[0]))
    got = client.decrypt(out)
    assert np.abs(got).max() < bound  # a real image is well inside
    spec["output"]["bound"] = float(np.abs(got).max()) / 2  # the same result, judged against a smaller range
    strict = client_for(spec)
    strict.backend = client.backend  # same keys
    strict._keyed = True
    with pytest.raises(OutOfRangeError, match="no diagnosis is given"):
        strict.decrypt(out)


def test_layer_errors_report_every_layer(hecnn_session, data_dir):
    _, server, client, keys = hecnn_session
    rows = layer_errors(server, client, pneumonia_images(data_dir, 1)[0], keys)
    assert [r["op"] for r in rows] == ["linear", "poly", "linear", "poly", "linear"]
    assert all(r["max_abs_error"] < 1e-2 for r in rows)
    assert rows[-1]["level"] == 0


def test_multilabel_client_uses_sigmoid():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), PolyAct((0.1, 0.5, 0.0)), nn.Linear(6, 3)).eval()
    server = CKKSServerModel(compile_plan(model, (1, 4, 4)), task="multi-label", labels=["a", "b", "c"])
    client = CKKSClient(server.spec())
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 4))
    logits = client.decrypt(server.infer(keys, client.encrypt(x)))
    want = model(torch.from_numpy(x[None]).float()).detach().double().numpy()[0]
    assert np.abs(logits - want).max() < 1e-2
    assert np.allclose(client.probabilities(logits), 1 / (1 + np.exp(-logits)))


def _logits_and_every_slot(plan, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run ``plan`` encrypted on ``x``; the client's logits and every slot of the decrypted result."""
    from medhe.he.ckks.wire import envelope

    server = CKKSServerModel(plan)
    client = CKKSClient(json.loads(json.dumps(server.spec())))
    client.keygen()
    out = server.infer(server.load_keys(client.evaluation_keys()), client.encrypt(x))
    part = envelope.unpack(out, envelope.KIND_OUTPUT, server.plan_id)[0]
    return client.decrypt(out), client.backend.decrypt(client.backend.load_ciphertext(part))


@pytest.mark.parametrize("outputs,trailing", [(2, False), (5, False), (5, True)])
def test_the_decrypted_result_holds_nothing_but_the_logits(data_dir, outputs, trailing):
    """The client decrypts every slot: each must be a copy of a logit or zero (p(0) after a trailing activation),
    never a partial sum of the private last layer's products (which is what a rotate-and-sum leaves there when
    ``clean_output`` is off)."""
    model = hecnn_like()
    torch.manual_seed(1)
    model[-1] = nn.Linear(32, outputs).eval()
    act = PolyAct((0.05, 0.9, 0.1))
    if trailing:
        model.append(act.eval())
    x = pneumonia_images(data_dir, 1)[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x[None])).double().numpy()[0]
    slot_values = {}
    for clean in (True, False):
        # (ranges recorded on one image are too tight to size the output from: give the bound)
        logits, slot_values[clean] = _logits_and_every_slot(
            compile_plan(model, x.shape, clean_output=clean, output_bound=64.0), x)
        assert np.abs(logits - want).max() < 1e-2
    period = 1 << (outputs - 1).bit_length()
    rows = np.arange(slot_values[True].size) % period
    zero = act.coefficients()[0] if trailing else 0.0  # p(0) = c
    expected = np.where(rows < outputs, want[np.minimum(rows, outputs - 1)], zero)
    assert np.abs(slot_values[True] - expected).max() < 1e-2
    # without it, slots around the logits carry values that are neither a logit nor zero
    leaked = slot_values[False]
    near_known = np.isclose(leaked[:, None], np.r_[want, zero][None, :], atol=1e-2).any(axis=1)
    assert (~near_known).sum() > 10


def test_clean_output_when_the_last_input_repeats_more_often_than_the_output():
    """4 hidden values replicated every 4 slots, 40 outputs (period 64): read from the first copy, still clean."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), PolyAct((0.1, 0.5, 0.0)), nn.Linear(4, 40)).eval()
    x = np.random.default_rng(3).uniform(-1, 1, (1, 4, 4)).astype(np.float32)
    plan = compile_plan(model, x.shape, output_bound=64.0)
    assert plan.strategies[-1].endswith("hybrid-replicated")
    logits, slots = _logits_and_every_slot(plan, x)
    with torch.no_grad():
        want = model(torch.from_numpy(x[None])).double().numpy()[0]
    assert np.abs(logits - want).max() < 1e-2
    rows = np.arange(slots.size) % 64
    assert np.abs(slots - np.where(rows < 40, want[np.minimum(rows, 39)], 0.0)).max() < 1e-2
