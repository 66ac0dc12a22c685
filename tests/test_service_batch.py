"""Batch mode end to end: a real ``medhe serve`` on 127.0.0.1, ``medhe predict --batch`` on a folder of real test
images, the batch endpoint's refusals (413 over the cap, unknown keys, wrong content type), and the folder's
bad-input paths."""

from __future__ import annotations

import csv
import socket

import httpx
import numpy as np
import pytest
from PIL import Image

from medhe.cli import main as medhe_main
from medhe.data import load_dataset, read_image
from medhe.models.artifact import load_artifact
from medhe.models.predict import model_inputs, predict_logits
from medhe.service import protocol
from medhe.service.launch import ServerProcess

pytest.importorskip("medhe.he.ckks._batch", reason="batch kernel not built (python setup.py build_ext)")

TOKEN = "batch-token-31f"
MAX_BATCH = 150 << 20  # one real pneumoniamnist batch is ~145 MB
N_IMAGES = 200


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["pneumoniamnist:ckks"], workers=1, token=TOKEN,
                       extra_args=["--max-batch-bytes", str(MAX_BATCH)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_dir):
    ds = load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir)
    root = tmp_path_factory.mktemp("scans")
    for i, img in enumerate(ds.images[:N_IMAGES]):
        Image.fromarray(np.asarray(img).reshape(28, 28).astype(np.uint8)).save(root / f"scan{i:03d}.png")
    return root


def _headers(**extra):
    return {"Authorization": f"Bearer {TOKEN}", **extra}


@pytest.mark.slow
def test_predict_batch_matches_plain_inference(server, folder, tmp_path, monkeypatch):
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    out = tmp_path / "diagnoses.csv"
    # an unreadable file stops the run before anything is encrypted, unless it is skipped on purpose
    assert medhe_main(["predict", "--server", server.url, "--batch", str(folder), "--out", str(out)]) == 2
    assert not out.exists()
    assert medhe_main(["predict", "--server", server.url, "--batch", str(folder), "--out", str(out),
                       "--skip-bad"]) == 0
    rows = list(csv.DictReader(out.open()))
    (folder / "zz-broken.png").unlink()
    assert len(rows) == N_IMAGES + 1
    assert rows[-1]["source"].endswith("zz-broken.png") and rows[-1]["error"] and not rows[-1]["label"]
    artifact = load_artifact("pneumoniamnist")
    paths = sorted(folder.glob("*.png"))
    plain = predict_logits(artifact.model, model_inputs(artifact, np.stack([read_image(p) for p in paths])))
    want = [artifact.labels[i] for i in plain.argmax(1)]
    assert [r["source"] for r in rows[:-1]] == [str(p) for p in paths]
    assert [r["label"] for r in rows[:-1]] == want
    p_pneumonia = np.array([float(r["p_pneumonia"]) for r in rows[:-1]])
    z = np.exp(plain - plain.max(1, keepdims=True))
    assert np.max(np.abs(p_pneumonia - (z / z.sum(1, keepdims=True))[:, 1])) < 1e-3


@pytest.mark.slow
def test_batch_endpoint_refusals(server):
    url = server.url
    spec = httpx.get(url + protocol.batch_path("pneumoniamnist"), headers=_headers(), timeout=120).json()
    assert spec["mode"] == "batch" and spec["rotation_steps"] == [] and spec["max_batch_bytes"] == MAX_BATCH
    infer = url + protocol.batch_infer_path("pneumoniamnist")
    from medhe.he.ckks.batch.client import CKKSBatchClient

    client = CKKSBatchClient(spec)
    client.keygen()
    r = httpx.post(url + protocol.batch_keys_path("pneumoniamnist"), content=client.evaluation_keys(),
                   headers=_headers(**{"Content-Type": protocol.OCTET}), timeout=60)
    assert r.status_code == 201, r.text
    key_id = r.json()["key_id"]
    hdr = _headers(**{"Content-Type": protocol.OCTET, protocol.KEY_HEADER: key_id})

    # declared too large: refused before the body is read (raw socket: httpx will not lie about the length)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = [f"POST {protocol.batch_infer_path('pneumoniamnist')} HTTP/1.1", f"Host: {host}",
                f"Content-Length: {MAX_BATCH + 1}", "Connection: close",
                *[f"{k}: {v}" for k, v in hdr.items()], "", ""]
        sock.sendall("\r\n".join(head).encode() + b"x" * 16)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and str(MAX_BATCH).encode() in reply

    def chunks():  # streamed (no Content-Length): refused as soon as it passes the cap
        block = bytes(1 << 20)
        for _ in range((MAX_BATCH >> 20) + 8):
            yield block

    r = httpx.post(infer, content=chunks(), headers=hdr, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"
    assert "--max-batch-bytes" in r.json()["error"]["message"]
    r = httpx.post(infer, content=b"garbage", headers=hdr, timeout=60)
    assert r.status_code == 422
    r = httpx.post(infer, content=b"garbage", headers={**hdr, "Content-Type": "text/plain"}, timeout=60)
    assert r.status_code == 415
    r = httpx.post(infer, content=b"garbage", headers={**hdr, protocol.KEY_HEADER: "unknown"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_key"
    r = httpx.delete(url + protocol.batch_key_path("pneumoniamnist", key_id), headers=_headers(), timeout=60)
    assert r.status_code == 204
    r = httpx.post(infer, content=b"garbage", headers=hdr, timeout=60)
    assert r.status_code == 404
    assert httpx.get(url + f"{protocol.PREFIX}/health", timeout=10).status_code == 200  # still up


def test_predict_batch_folder_errors(tmp_path, capsys):
    good = np.zeros((28, 28), dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "b.png")
    # no server is contacted: the folder is checked first
    assert medhe_main(["predict", "--server", "http://127.0.0.1:9", "--batch", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.png" in err[0] and "same size" in err[0] and "a.png" in err[0]
    (tmp_path / "b.png").unlink()
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    assert medhe_main(["predict", "--server", "http://127.0.0.1:9", "--batch", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "c.png" in err and "3 channels" in err
    assert medhe_main(["predict", "--server", "http://127.0.0.1:9", "--batch", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert medhe_main(["predict", "--server", "http://127.0.0.1:9", str(tmp_path / "a.png"), "--skip-bad"]) == 2
    assert "--batch" in capsys.readouterr().err
