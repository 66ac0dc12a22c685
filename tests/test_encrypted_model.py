"""Encrypted-weight CKKS models (P3): real SEAL keys and ciphertexts, real test images, a real server process.

The shipped pneumoniamnist model is encrypted once per module (key set A); a second key set (B) for the same model
plays the hospital that holds the wrong keys.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medhe.cli import main as medhe_main
from medhe.data import load_dataset
from medhe.errors import ArtifactError, CiphertextError, MedheError, SecurityError
from medhe.he.ckks.wire import envelope as wire
from medhe.he.ckks.client import CKKSClient
from medhe.he.ckks.encrypted.client import KeyHolderClient
from medhe.he.ckks.encrypted.keys import SECRET_FILE, create_keydir, load_keydir
from medhe.he.ckks.encrypted.model import WEIGHTS_FILE, load_encrypted_model, spec_for, write_encrypted_model
from medhe.he.ckks.encrypted.spec import encrypted_key_levels, simulate_encrypted
from medhe.he.ckks.compiler.driver import compile_plan
from medhe.he.ckks.server import compile_ckks
from medhe.he.ckks.simulate import simulate
from medhe.models import layers
from medhe.models.artifact import load_artifact
from medhe.models.predict import model_inputs, predict_logits
from medhe.models.zoo import build_model
from medhe.service.launch import free_port

REPO = Path(__file__).resolve().parents[1]


# -- P3 networks -----------------------------------------------------------------------------------------------------
def test_p3cnn_is_conv_bn_relu2_blocks_with_average_pooling():
    model = build_model("p3cnn")
    mods = list(model)
    blocks = [i for i in range(len(mods) - 2) if isinstance(mods[i], nn.Conv2d)
              and isinstance(mods[i + 1], nn.BatchNorm2d) and isinstance(mods[i + 2], layers.ReLUApprox)]
    assert len(blocks) >= 3
    assert any(isinstance(m, nn.AvgPool2d) for m in mods)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    layers.check_he_friendly(model)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 2)


def test_act_relu2_reaches_other_architectures_and_bad_values_are_refused():
    model = build_model("hecnn", act="relu2", act_range=3.0)
    acts = [m for m in model.modules() if isinstance(m, layers.RangeRecorder)]
    assert acts and all(isinstance(m, layers.ReLUApprox) and m.input_range == 3.0 for m in acts)
    with pytest.raises(MedheError, match="unknown activation"):
        build_model("hecnn", act="gelu")
    with pytest.raises(MedheError, match="at least three blocks"):
        build_model("p3cnn", widths=[4, 4], strides=[1, 1])


def test_train_cli_act_flag_is_recorded_and_conflicts_are_one_line(tmp_path, capsys):
    out = tmp_path / "m"
    assert medhe_main(["train", "--dataset", "pneumoniamnist", "--arch", "p3cnn", "--act", "relu2", "--epochs", "1",
                       "--limit", "64", "--batch-size", "32", "--out", str(out), "--no-progress"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["arch_kwargs"]["act"] == "relu2" and "--act relu2" in card["training"]["command"]
    assert medhe_main(["train", "--dataset", "pneumoniamnist", "--act", "relu2", "--arch-arg", "act=poly",
                       "--out", str(tmp_path / "x")]) == 2
    assert "contradicts" in capsys.readouterr().err


# -- compiler accounting ---------------------------------------------------------------------------------------------
def _small_model():
    torch.manual_seed(1)
    model = build_model("p3cnn", widths=[2, 2, 2], strides=[2, 2, 1], pool=1).eval()
    layers.set_recording(model, True)
    with torch.no_grad():
        model(torch.rand(16, 1, 28, 28) * 2 - 1)
    return model


def test_encrypted_program_matches_the_plaintext_program_slot_for_slot():
    model = _small_model()
    plan = compile_plan(model, (1, 28, 28), layers.activation_ranges(model))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 28, 28))
    ref = model(torch.from_numpy(x[None]).float()).detach().numpy()[0]
    assert np.allclose(simulate_encrypted(plan, x), simulate(plan, x), atol=1e-9)
    assert np.allclose(simulate_encrypted(plan, x), ref, atol=1e-4)
    levels = encrypted_key_levels(plan)
    assert levels["relin"] == plan.input_level  # the first layer's products are relinearized at the top
    spec = spec_for(plan, {"name": "small", "task": "binary-class", "labels": ["a", "b"]})
    enc = spec["encrypted_model"]
    assert enc["weight_ciphertexts"] == len(plan.plains) and enc["depth"] == plan.depth
    assert enc["weight_relinearizations"] == sum(len(i.groups) for i in plan.instrs if i.op == "linear")
    assert enc["bytes"] > 0 and spec["relinearization"] is True


# -- real encryption -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact():
    return load_artifact("pneumoniamnist")


@pytest.fixture(scope="module")
def plain_server(artifact):
    return compile_ckks(artifact)


@pytest.fixture(scope="module")
def keys_a(tmp_path_factory, artifact, plain_server):
    return create_keydir(spec_for(plain_server.plan, artifact.card), tmp_path_factory.mktemp("ka") / "keys")


@pytest.fixture(scope="module")
def keys_b(tmp_path_factory, artifact, plain_server):
    return create_keydir(spec_for(plain_server.plan, artifact.card), tmp_path_factory.mktemp("kb") / "keys")


@pytest.fixture(scope="module")
def encdir(tmp_path_factory, artifact, plain_server, keys_a):
    out = tmp_path_factory.mktemp("enc") / "model"
    write_encrypted_model(plain_server.plan, artifact.card, keys_a, out, progress=False)
    return out


@pytest.fixture(scope="module")
def test_images(data_dir):
    return load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images


def test_keydir_secret_key_is_private_and_checked(keys_a, tmp_path):
    secret = keys_a.path / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_a.path.stat().st_mode) == 0o700
    copy = tmp_path / "copy"
    shutil.copytree(keys_a.path, copy)
    os.chmod(copy / SECRET_FILE, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_keydir(copy).backend()
    with pytest.raises(MedheError, match="not empty"):
        create_keydir(keys_a.spec, keys_a.path)


@pytest.mark.slow
def test_encrypted_weights_agree_with_plaintext_weights_on_real_images(artifact, plain_server, keys_a, encdir,
                                                                        test_images):
    x = model_inputs(artifact, test_images[:8])
    torch_logits = predict_logits(artifact.model, x)
    server = load_encrypted_model(encdir)
    client = KeyHolderClient(server.spec(), keys_a)
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    pclient = CKKSClient(plain_server.spec())
    pclient.keygen()
    pkeys = plain_server.load_keys(pclient.evaluation_keys())
    for i in range(len(x)):
        enc = client.decrypt(server.infer(keys, client.encrypt(x[i])))
        plain_plan = pclient.decrypt(plain_server.infer(pkeys, pclient.encrypt(x[i])))
        assert np.max(np.abs(enc - torch_logits[i])) < 1e-2
        assert np.max(np.abs(enc - plain_plan)) < 1e-2
        assert enc.argmax() == torch_logits[i].argmax()


@pytest.mark.slow
def test_a_key_set_that_does_not_match_is_refused_by_client_and_server(encdir, keys_a, keys_b, artifact):
    server = load_encrypted_model(encdir)
    with pytest.raises(SecurityError, match="do not match"):
        KeyHolderClient(server.spec(), keys_b)
    wrong = wire.pack(wire.KIND_KEYS, server.plan_id, keys_b.evaluation_key_parts())
    with pytest.raises(CiphertextError, match="not the key set"):
        server.load_keys(wrong)
    fresh = CKKSClient(server.spec())  # a fresh key pair of the right shape: also not the bound key set
    fresh.keygen()
    with pytest.raises(CiphertextError, match="not the key set"):
        server.load_keys(fresh.evaluation_keys())
    with pytest.raises(MedheError, match="plaintext weights"):
        keys_a.check_matches(compile_ckks(artifact).spec(), "that server")


def test_keys_of_another_model_cannot_encrypt_this_one(keys_a, tmp_path):
    other = load_artifact("breastmnist")
    with pytest.raises(MedheError, match="another model"):
        write_encrypted_model(compile_ckks(other).plan, other.card, keys_a, tmp_path / "enc", progress=False)


def test_a_damaged_encdir_is_refused_in_one_line(encdir, tmp_path):
    copy = tmp_path / "enc"
    shutil.copytree(encdir, copy)
    blob = bytearray((copy / WEIGHTS_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="checksum"):
        load_encrypted_model(copy)
    shutil.copytree(encdir, tmp_path / "enc2")
    spec = json.loads((tmp_path / "enc2" / "spec.json").read_text())
    spec["output"]["level"] += 1
    (tmp_path / "enc2" / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="plan id"):
        load_encrypted_model(tmp_path / "enc2")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_encrypted_model(tmp_path / "missing")


# -- the server never holds a weight ---------------------------------------------------------------------------------
def _weight_patterns(artifact, plan) -> np.ndarray:
    """8-byte patterns a leaked weight would leave: every model parameter and BN statistic as float64, every
    adjacent pair as float32 (how tensors are stored), and every value of every plaintext the plan encodes (folded
    and scaled weights) as float64. Single float32 values (4 bytes) are not searched: in megabytes of ciphertext a
    random 4-byte match is expected for some of tens of thousands of weights, so it would prove nothing."""
    pats = []
    for tensor in artifact.model.state_dict().values():
        if not tensor.dtype.is_floating_point:
            continue
        v = tensor.detach().reshape(-1).numpy()
        v = v[(v != 0) & (np.abs(v) != 1)]
        pats.append(v.astype(np.float64).view(np.uint64))
        f32 = np.ascontiguousarray(v.astype(np.float32))
        if f32.size >= 2:
            pairs = np.stack([f32[:-1], f32[1:]], axis=1)
            pats.append(np.ascontiguousarray(pairs).view(np.uint64).reshape(-1))
    for p in plan.plains:
        vals = np.atleast_1d(np.asarray(p.values))
        vals = np.concatenate([vals.real, vals.imag]) if np.iscomplexobj(vals) else vals.astype(np.float64)
        vals = vals[(vals != 0) & (np.abs(vals) != 1)]
        pats.append(np.unique(vals).view(np.uint64))
    return np.unique(np.concatenate(pats))


def _leaks(data: bytes, patterns: np.ndarray) -> int:
    hits = 0
    for offset in range(8):
        chunk = data[offset:]
        chunk = chunk[: len(chunk) // 8 * 8]
        if chunk:
            hits += int(np.isin(np.frombuffer(chunk, dtype=np.uint64), patterns).sum())
    return hits


_AUDIT = """
import sys
log = open(sys.argv[1], "w", buffering=1)
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        log.write(str(args[0]) + "\\n")
sys.addaudithook(hook)
from medhe.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_serve_encrypted_model_with_only_encdir_never_holds_a_weight(tmp_path, encdir, keys_a, keys_b, artifact,
                                                                       plain_server, test_images):
    """``medhe serve --encrypted-model`` runs from a copy of medhe without any shipped model (so no plaintext model
    is readable to it), with its own temp and working folders; every file it opens is logged. Afterwards no weight
    value appears in ENCDIR, in its log, its temporary files or any answer it gave."""
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "src" / "medhe", pkg / "medhe", ignore=shutil.ignore_patterns("pretrained", "__pycache__"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "audit.py").write_text(_AUDIT)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDHE")}
    env.update(PYTHONPATH=str(pkg), TMPDIR=str(tmp_path / "tmp"), HOME=str(tmp_path / "cwd"),
               MEDHE_DATA=str(tmp_path / "no-data"), MEDHE_OFFLINE="1")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "audit.py"), str(tmp_path / "opened.txt"), "serve",
                             "--encrypted-model", str(encdir), "--port", str(port), "--workers", "0",
                             "--log-level", "info"], cwd=tmp_path / "cwd", env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    answers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/v1/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models", timeout=30)
        answers.append(models.content)
        info = models.json()["models"][0]
        assert info["spec"]["encrypted_model"]["key_id"] == keys_a.key_id
        # the wrong key set: a 4xx from the server
        wrong = httpx.post(url + info["endpoints"]["keys"], timeout=60,
                           content=wire.pack(wire.KIND_KEYS, info["spec"]["plan_id"], keys_b.evaluation_key_parts()),
                           headers={"Content-Type": "application/octet-stream"})
        answers.append(wrong.content)
        assert wrong.status_code == 422 and "not the key set" in wrong.json()["error"]["message"]
        # the key holder diagnoses PNG scans through the CLI
        paths = []
        for i in range(3):
            paths.append(tmp_path / f"scan{i}.png")
            Image.fromarray(test_images[i].squeeze()).save(paths[i])
        out = subprocess.run([sys.executable, "-m", "medhe", "predict", "--server", url, "--keys", str(keys_a.path),
                              "--json", *map(str, paths)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        results = json.loads(out.stdout)["results"]
        ref = predict_logits(artifact.model, model_inputs(artifact, test_images[:3]))
        for r, logits in zip(results, ref):
            assert np.max(np.abs(np.asarray(r["logits"]) - logits)) < 1e-2
        no_keys = subprocess.run([sys.executable, "-m", "medhe", "predict", "--server", url, str(paths[0])],
                                 capture_output=True, text=True, timeout=120)
        assert no_keys.returncode == 2 and "--keys KEYDIR" in no_keys.stderr
        assert len(no_keys.stderr.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    opened = (tmp_path / "opened.txt").read_text().splitlines()
    assert not [p for p in opened if p.endswith(".safetensors") or "pretrained" in p or str(keys_a.path) in p]
    assert any(p.endswith(WEIGHTS_FILE) for p in opened)
    patterns = _weight_patterns(artifact, plain_server.plan)
    assert patterns.size > 1000
    written = [f for folder in (encdir, tmp_path / "tmp", tmp_path / "cwd") for f in Path(folder).rglob("*")
               if f.is_file()] + [tmp_path / "server.log"]
    for f in written:
        assert _leaks(f.read_bytes(), patterns) == 0, f
    for body in answers:
        assert _leaks(body, patterns) == 0
    # the search is not vacuous: it finds the weights in the plaintext model's own file
    assert _leaks((Path(artifact.path) / "model.safetensors").read_bytes(), patterns) > 1000


# -- CLI -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["keygen", "encrypt-model"])
def test_key_holder_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        medhe_main([command, "--help"])
    assert exc.value.code == 0 and "KEYDIR" in capsys.readouterr().out


def test_keygen_compile_options_are_recorded_and_reused_by_encrypt_model(tmp_path, capsys):
    keys, enc = tmp_path / "keys", tmp_path / "enc"
    assert medhe_main(["keygen", "--model", "pneumoniamnist", "--poly-degree", "16384", "--scale-bits", "40",
                       "--out", str(keys)]) == 0
    assert "N=16384" in capsys.readouterr().out
    assert load_keydir(keys).compile_options == {"poly_degree": 16384, "scale_bits": 40}
    assert medhe_main(["encrypt-model", "--model", "pneumoniamnist", "--keys", str(keys), "--out", str(enc),
                       "--no-progress"]) == 0
    server = load_encrypted_model(enc)
    assert server.plan.params.poly_degree == 16384 and server.plan.params.scale_bits == 40
    assert server.spec()["encrypted_model"]["key_id"] == load_keydir(keys).key_id


def test_cli_errors_are_one_line(tmp_path, keys_a, encdir, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    scan = tmp_path / "scan.png"  # a real test image: predict reads its images before it looks at the key folder
    Image.fromarray(load_dataset("pneumoniamnist", split="test", size=28).images[0]).save(scan)
    cases = [
        (["keygen", "--model", "pneumoniamnist", "--out", str(tmp_path / "full")], "not empty"),
        (["keygen", "--model", "no-such-model", "--out", str(tmp_path / "k")], "no-such-model"),
        (["keygen", "--model", "pneumoniamnist", "--scale-bits", "80", "--out", str(tmp_path / "k")], "bits"),
        (["encrypt-model", "--model", "pneumoniamnist", "--keys", str(tmp_path / "nokeys"), "--out",
          str(tmp_path / "e")], "medhe keygen"),
        (["encrypt-model", "--model", "pneumoniamnist", "--keys", str(keys_a.path), "--out", str(encdir)],
         "not empty"),
        (["evaluate", "--model", "pneumoniamnist", "--scheme", "ckks", "--encrypted-model", str(encdir)],
         "go together"),
        (["evaluate", "--model", "pneumoniamnist", "--scheme", "paillier", "--encrypted-model", str(encdir),
          "--keys", str(keys_a.path)], "--scheme ckks"),
        (["evaluate", "--model", "pneumoniamnist", "--scheme", "ckks", "--encrypted-model", str(tmp_path / "none"),
          "--keys", str(keys_a.path), "--limit", "1"], "does not exist"),
        (["serve", "--port", str(free_port())], "nothing to serve"),
        (["serve", "--encrypted-model", str(tmp_path / "none"), "--port", str(free_port())], "card.json"),
        (["predict", "--server", "http://127.0.0.1:9", "--keys", str(tmp_path / "nokeys"), str(scan)], "medhe keygen"),
    ]
    for args, words in cases:
        assert medhe_main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and words in err, (args, err)


# -- the shipped P3 model --------------------------------------------------------------------------------------------
def test_shipped_p3_model_meets_its_bars_and_compiles_at_128_bits(data_dir):
    from medhe.he.security import security_bits
    from medhe.models.metrics import compute_metrics

    artifact = load_artifact("pneumoniamnist-p3")
    assert artifact.card["arch"] == "p3cnn" and artifact.card["arch_kwargs"]["act"] == "relu2"
    assert "--act relu2" in artifact.card["training"]["command"]
    acts = list(layers.activation_sites(artifact.model).values())
    assert len(acts) >= 3 and all(isinstance(a, layers.ReLUApprox) for a in acts)
    test = load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir)
    metrics = compute_metrics(artifact.task, test.labels, predict_logits(artifact.model,
                                                                         model_inputs(artifact, test.images)))
    assert len(test.labels) == 624 and metrics["acc"] >= 0.90 and metrics["auc"] >= 0.95
    plan = compile_ckks(artifact, backend="seal").plan
    assert security_bits(plan.params.poly_degree, plan.params.prime_bits) >= 128
    assert plan.depth == 2 * len(acts) + 1  # BN, activation scales and the pool fold into the linear layers
    x = model_inputs(artifact, test.images[:2])
    for xi, ref in zip(x, predict_logits(artifact.model, x)):
        assert np.max(np.abs(simulate_encrypted(plan, xi) - ref)) < 1e-3


@pytest.mark.slow
def test_shipped_p3_model_runs_with_encrypted_weights(tmp_path, data_dir):
    artifact = load_artifact("pneumoniamnist-p3")
    plain_server = compile_ckks(artifact)
    keys = create_keydir(spec_for(plain_server.plan, artifact.card), tmp_path / "keys")
    write_encrypted_model(plain_server.plan, artifact.card, keys, tmp_path / "enc", progress=False)
    server = load_encrypted_model(tmp_path / "enc")
    client = KeyHolderClient(server.spec(), keys)
    client.keygen()
    ekeys = server.load_keys(client.evaluation_keys())
    x = model_inputs(artifact, load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images[:2])
    for xi, ref in zip(x, predict_logits(artifact.model, x)):
        out = client.decrypt(server.infer(ekeys, client.encrypt(xi)))
        assert np.max(np.abs(out - ref)) < 1e-2 and out.argmax() == ref.argmax()
