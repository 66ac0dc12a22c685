"""Values spanning several ciphertexts (``compiler.blocks`` / ``blocklower``): models whose tensors do not fit one
ciphertext compile to multi-block plans whose slot arithmetic equals torch exactly (simulator), which run encrypted
on SEAL and the native runtime within the usual tolerance, native bit for bit like SEAL without hoisting; a client
sending the wrong number of blocks gets a clear error; one-ciphertext plans are untouched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medhe.errors import CiphertextError
from medhe.he.ckks import CKKSClient, compile_plan
from medhe.he.ckks.inspect import describe, render
from medhe.he.ckks.server import CKKSServerModel
from medhe.he.ckks.simulate import simulate
from medhe.he.ckks.wire import envelope
from medhe.models.autoencoder import build_latent_classifier
from medhe.models.layers import PolyAct

sys.path.insert(0, str(Path(__file__).parent))  # the docs-only protocol client lives beside this file


def _bn(n: int) -> nn.Module:
    bn = nn.BatchNorm2d(n)
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 1.5)
    return bn


def shallow_8192() -> nn.Sequential:
    """1x64x64 -> 8 channels (8 blocks of 4096 slots at N=8192), pool, strided conv, dense: depth 5."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _bn(8), PolyAct((0.1, 0.5, 0.1)), nn.AvgPool2d(2),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), _bn(8), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
    return model.eval()


def latent_64() -> nn.Sequential:
    """The P1 classifier family at 1x64x64, width 8: conv, pool, SE and the head across blocks (N=16384)."""
    torch.manual_seed(4)
    model = build_latent_classifier(in_channels=1, image_size=64, width=8, num_outputs=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def shallow():
    model = shallow_8192()
    plan = compile_plan(model, (1, 64, 64), poly_degree=8192)
    return model, plan


def _x(seed: int, shape=(1, 64, 64)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 2 - 1).astype(np.float32)


def test_shallow_model_spans_blocks_and_is_exact_in_the_simulator(shallow):
    model, plan = shallow
    assert plan.multi_block and plan.params.poly_degree == 8192
    assert max(len(regs) for regs in plan.node_blocks.values()) >= 8
    assert plan.input_ciphertexts == 1  # the 4096-pixel input fits one ciphertext
    x = _x(0)
    want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
    got = simulate(plan, x)
    assert np.abs(got - want).max() < 1e-6 * max(1.0, np.abs(want).max())
    assert plan.public()["input"]["blocks"] == 1


def test_pool_se_and_head_across_blocks_are_exact_in_the_simulator():
    model = latent_64()
    plan = compile_plan(model, (1, 64, 64))
    assert plan.multi_block
    assert any("block-hybrid" in s for s in plan.strategies)  # SE mean and head gather blocks into one
    ring = [c for c in plan.choices if c.startswith("ring N=")]  # the cheapest deep-enough ring, and why
    assert len(ring) == 1 and "predicted" in ring[0] and "rejected: N=32768" in ring[0]
    for seed in range(2):
        x = _x(seed)
        want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
        assert np.abs(simulate(plan, x) - want).max() < 1e-6 * max(1.0, np.abs(want).max())


def test_input_larger_than_one_ciphertext_is_sent_as_blocks():
    torch.manual_seed(5)
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, 2, 3, padding=1), PolyAct((0.2, 0.5, 0.0)),
                          nn.AvgPool2d(4), nn.Flatten(), nn.Linear(2 * 16 * 16, 3)).eval()
    plan = compile_plan(model, (1, 128, 128), poly_degree=8192)
    assert plan.multi_block and plan.input_ciphertexts == 4  # 16384 pixels over 4096-slot ciphertexts
    pub = plan.public()
    assert pub["input"]["ciphertexts"] == 4 and pub["input"]["blocks"] == 4
    x = _x(1, (1, 128, 128))
    want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
    assert np.abs(simulate(plan, x) - want).max() < 1e-6 * max(1.0, np.abs(want).max())


def _session(plan, backend):
    srv = CKKSServerModel(plan, backend=backend)
    client = CKKSClient(json.loads(json.dumps(srv.spec())))
    client.keygen()
    client.key_bytes = client.evaluation_keys()  # one draw: each call makes fresh key randomness
    return srv, client, srv.load_keys(client.key_bytes)


@pytest.mark.parametrize("backend", ["seal", "native"])
def test_multi_block_plan_runs_encrypted(shallow, backend):
    model, plan = shallow
    srv, client, keys = _session(plan, backend)
    assert srv.backend.name == backend
    for seed in range(2):
        x = _x(seed)
        want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
        got = client.decrypt(srv.infer(keys, client.encrypt(x)))
        assert np.abs(got - want).max() <= 1e-2


def test_native_without_hoisting_is_seal_byte_for_byte_on_multi_block_maps(shallow):
    _, plan = shallow
    seal_srv, client, ks = _session(plan, "seal")
    nat_srv = CKKSServerModel(plan, backend="native")
    kn = nat_srv.load_keys(client.key_bytes)
    exact = nat_srv.backend.compile(plan, nat_srv.plains, hoist=False)
    ct = client.encrypt(_x(2))
    out_seal = seal_srv.evaluate(ks, seal_srv.load_inputs(ct))
    out_exact = exact.evaluate(kn.galois, nat_srv.load_inputs(ct))
    assert nat_srv.backend.serialize(out_exact) == seal_srv.backend.serialize(out_seal)


def test_wrong_block_count_from_a_client_is_refused_clearly():
    torch.manual_seed(6)
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, 2, 3, padding=1), PolyAct((0.2, 0.5, 0.0)),
                          nn.AvgPool2d(4), nn.Flatten(), nn.Linear(2 * 16 * 16, 3)).eval()
    plan = compile_plan(model, (1, 128, 128), poly_degree=8192)
    srv, client, keys = _session(plan, "seal")
    parts = envelope.unpack(client.encrypt(_x(1, (1, 128, 128))), envelope.KIND_INPUT, srv.plan_id)
    for bad in (parts[:-1], parts + parts[:1]):
        with pytest.raises(CiphertextError, match="4"):
            srv.infer(keys, envelope.pack(envelope.KIND_INPUT, srv.plan_id, bad))
    swapped = [parts[1], parts[0]] + parts[2:]  # blocks out of order decrypt to garbage, never crash
    srv.infer(keys, envelope.pack(envelope.KIND_INPUT, srv.plan_id, swapped))


def test_inspect_reports_every_layer_and_the_blocking(shallow):
    _, plan = shallow
    info = describe(plan)
    assert info["multi_block"] and info["params"]["security_bits"] >= 128
    assert {r["op"] for r in info["layers"]} >= {"linear", "poly2"}
    assert max(r["layout"]["blocks"] for r in info["layers"]) >= 8
    assert info["totals"]["rotations"] == plan.rotation_count()
    assert any("blocking" in r for r in info["layers"])
    text = render(info)
    assert "layouts chosen" in text and "security" in text


def test_one_ciphertext_plans_do_not_change():
    """Models that fit one ciphertext never take the block path (same instructions as before)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _bn(4), PolyAct((0.1, 0.5, 0.1)), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    plan = compile_plan(model, (1, 16, 16))
    assert not plan.multi_block and "blocks" not in plan.public()["input"]


@pytest.mark.slow
def test_256_pixel_width_8_classifier_compiles_at_128_bits():
    """P1's pixel row: 1x256x256, 8 channels after the first conv (32+ blocks)."""
    torch.manual_seed(8)
    model = build_latent_classifier(in_channels=1, image_size=256, width=8, num_outputs=14).eval()
    plan = compile_plan(model, (1, 256, 256))
    info = describe(plan)
    assert plan.multi_block and info["params"]["security_bits"] >= 128
    assert max(len(r) for r in plan.node_blocks.values()) >= 16
    x = _x(9, (1, 256, 256))
    want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
    assert np.abs(simulate(plan, x) - want).max() < 1e-5 * max(1.0, np.abs(want).max())


def test_multi_block_plan_files_round_trip_and_run(shallow):
    from medhe.he.ckks.planfile import dump_server, load_server

    model, plan = shallow
    srv, client, keys = _session(plan, "seal")
    loaded = load_server(dump_server(srv), backend="seal")
    assert loaded.plan_id == srv.plan_id and loaded.plan.multi_block
    assert loaded.plan.node_blocks == plan.node_blocks and loaded.plan.choices == plan.choices
    x = _x(4)
    want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
    got = client.decrypt(loaded.infer(loaded.load_keys(client.key_bytes), client.encrypt(x)))
    assert np.abs(got - want).max() <= 1e-2


@pytest.mark.slow
def test_service_and_sdk_serve_a_multi_block_model(tmp_path, data_dir):
    """A real ``medhe serve`` on 127.0.0.1 with a model whose tensors span ciphertexts: the SDK, and the client
    written only from docs/protocol.md, send the input as several ciphertexts in one envelope and get the plaintext
    model's logits back."""
    from medhe.data import Preprocess, load_dataset
    from medhe.models import layers
    from medhe.models.artifact import load_artifact, save_artifact
    from medhe.models.predict import model_inputs, predict_logits
    from medhe.models.train import record_ranges
    from medhe.service.client import Client
    from medhe.service.launch import ServerProcess

    torch.manual_seed(11)
    kwargs = {"in_channels": 1, "num_outputs": 2, "image_size": 128, "width": 2}
    model = build_latent_classifier(**kwargs)
    pre = Preprocess(channels=1, size=128)
    # real 128-px chest X-rays (Kermany's 224-px set, grey stored as RGB): the SDK refuses scans smaller than the
    # model's input, as it does for a hospital's
    images = load_dataset("kermany_pneumonia_224", split="val", size=128, data_dir=data_dir).images[:34, :, :, 0]
    record_ranges(model, pre.batch(images[:32]))
    card = {"name": "blocks128", "arch": "latent-hecnn", "arch_kwargs": kwargs, "task": "binary-class",
            "labels": ["normal", "pneumonia"], "dataset": {"name": "kermany_pneumonia_224", "size": 128},
            "preprocessing": pre.to_dict(), "activation_ranges": layers.activation_ranges(model)}
    model_dir = save_artifact(tmp_path / "blocks128", model.eval(), card)
    art = load_artifact(model_dir)
    test = images[32:34]
    plain = predict_logits(art.model, model_inputs(art, np.asarray(test)))
    import test_protocol_conformance as doc  # the client written only from docs/protocol.md

    with ServerProcess([str(model_dir)], workers=1, token=doc.TOKEN) as srv:
        with Client(srv.url, token=doc.TOKEN) as client:
            assert client.session("blocks128").he.gather.shape[0] >= 2  # the input itself spans ciphertexts
            results = client.diagnose_many(list(test), progress=False, model="blocks128")
        info = doc.models(srv.url)["blocks128"]
        assert info["spec"]["input"]["blocks"] == info["spec"]["input"]["ciphertexts"] >= 2
        paths = []
        for i, img in enumerate(test):
            paths.append(tmp_path / f"b{i}.png")
            Image.fromarray(np.asarray(img)).save(paths[-1])
        doc_client = doc.CKKSClient(info)
        bodies = [doc_client.encrypt(doc.preprocess(p, info["preprocessing"])) for p in paths]
        doc_logits = [doc_client.decrypt(r) for r in doc.register_and_infer(srv.url, info, doc_client.keys(), bodies)]
    for got, by_docs, want in zip(results, doc_logits, plain):
        assert np.abs(np.asarray(got.logits) - want).max() <= 1e-2
        assert np.abs(np.asarray(by_docs) - want).max() <= 1e-2


def test_inspect_command_prints_the_plan(capsys):
    from medhe.cli import main

    assert main(["inspect", "pneumoniamnist", "--scheme", "ckks"]) == 0
    text = capsys.readouterr().out
    assert "128-bit security" in text and "rotations" in text and "total:" in text
    assert main(["inspect", "pneumoniamnist", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] and info["totals"]["rotations"] > 0 and not info["multi_block"]
    assert main(["inspect", "no-such-model"]) == 2  # one-line error, no traceback


@pytest.mark.slow
def test_blockbench_measures_the_server_alone(tmp_path, capsys):
    """The bench's parent/child split and its report; a small plan (the 64x64 width-8 one runs encrypted in
    test_ckks_blocks_se.py, twice)."""
    from medhe.he.ckks import blockbench

    out = tmp_path / "b.json"
    assert blockbench.main(["--shape", "1x32x32", "--width", "4", "--backend", "native", "--images", "1",
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["max_abs_logit_err"] <= 1e-2 and report["backend"] == "native"
    assert report["server_peak_rss_gb"] > 0 and len(report["server_eval_s"]) == 1


@pytest.mark.parametrize("hoist", ["1", "0"])
def test_native_runs_plans_whose_weights_exceed_the_memory_budget(shallow, monkeypatch, hoist):
    """Past the plaintext budget the native backend encodes weights on use through the interpreter (hoisting baby
    rotations unless MEDHE_NATIVE_HOIST=0, which stays SEAL's bits)."""
    import medhe.he.ckks.server as server_module

    model, plan = shallow
    monkeypatch.setattr(server_module, "PLAINTEXT_CACHE_BYTES", 8 << 20)
    monkeypatch.setenv("MEDHE_NATIVE_HOIST", hoist)
    srv, client, keys = _session(plan, "native")
    assert srv._program.program is None and len(srv.plains.cache) < len(srv.plains)
    x = _x(5)
    ct = client.encrypt(x)
    want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
    got = client.decrypt(srv.infer(keys, ct))
    assert np.abs(got - want).max() <= 1e-2
    if hoist == "0":
        seal_srv = CKKSServerModel(plan, backend="seal")
        out_seal = seal_srv.evaluate(seal_srv.load_keys(client.key_bytes), seal_srv.load_inputs(ct))
        out_nat = srv.evaluate(keys, srv.load_inputs(ct))
        assert srv.backend.serialize(out_nat) == seal_srv.backend.serialize(out_seal)


def test_layer_errors_cover_every_block(shallow):
    from medhe.he.ckks import layer_errors

    _, plan = shallow
    srv, client, keys = _session(plan, "seal")
    rows = layer_errors(srv, client, _x(6), keys)
    assert len(rows) >= 3 and all(r["max_abs_error"] < 1e-2 * max(1.0, r["max_abs_value"]) for r in rows)
    assert any(r["shape"] == [8, 64, 64] for r in rows)  # the 8-block conv output, compared element by element


def test_residual_across_blocks_is_exact_in_the_simulator():
    """A residual whose operands come back at different scales: each block is brought back on its own."""
    from medhe.models.layers import Residual

    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), PolyAct((0.1, 0.5, 0.1)), nn.AvgPool2d(2),
                          Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), PolyAct((0.1, 0.5, 0.0)))),
                          nn.AvgPool2d(8), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    plan = compile_plan(model, (1, 128, 128))
    assert plan.multi_block
    x = _x(7, (1, 128, 128))
    want = model(torch.tensor(x)[None]).detach().double().numpy()[0]
    assert np.abs(simulate(plan, x) - want).max() < 1e-6 * max(1.0, np.abs(want).max())
