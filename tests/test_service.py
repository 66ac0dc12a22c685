"""End to end: a real ``medhe serve`` on 127.0.0.1, the SDK and ``medhe predict`` against it, real encryption.

One server (its own process, one worker process, bearer token) serves the shipped pneumoniamnist model (CKKS),
a tiny second CKKS model trained here, so "keys/ciphertexts for another model" are genuinely another model's
bytes, and the shipped covid-cxr model under Paillier, whose public feature extractor runs on the client: the
same endpoints serve every scheme.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from medhe.cli import main as medhe_main
from medhe.data import load_dataset, read_image
from medhe.errors import MedheError
from medhe.models.artifact import load_artifact
from medhe.models.predict import model_inputs, predict_logits
from medhe.service import protocol
from medhe.service.client import Client
from medhe.service.errors import ServiceError
from medhe.service.launch import ServerProcess
from medhe.service.loadtest import run_load_test

from dicom_files import write_dicom  # noqa: E402  (tests/, on pytest's path)

pytestmark = pytest.mark.slow  # starts a server process and runs real CKKS (CI runs it)

TOKEN = "test-token-7c1f"
MAX_BODY = 8 << 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, data_dir):
    """A second, different model (other architecture, other plan) for the wrong-model cases; untrained on purpose:
    only its bytes being another model's matter."""
    import torch

    from medhe.data import Preprocess
    from medhe.models import layers
    from medhe.models.artifact import save_artifact
    from medhe.models.train import record_ranges
    from medhe.models.zoo import build_model

    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "num_outputs": 2, "image_size": 28, "hidden": 8}
    model = build_model("fcnn", **kwargs)
    pre = Preprocess(channels=1, size=28)
    record_ranges(model, pre.batch(load_dataset("pneumoniamnist", split="val", size=28,
                                                data_dir=data_dir).images[:64]))
    card = {"name": "tiny", "arch": "fcnn", "arch_kwargs": kwargs, "task": "binary-class",
            "labels": ["normal", "pneumonia"], "dataset": {"name": "pneumoniamnist", "size": 28},
            "preprocessing": pre.to_dict(), "activation_ranges": layers.activation_ranges(model)}
    return save_artifact(tmp_path_factory.mktemp("tiny"), model.eval(), card)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServerProcess(["pneumoniamnist:ckks", str(tiny_dir), "covid-cxr:paillier"], workers=1, token=TOKEN,
                       extra_args=["--max-body", str(MAX_BODY)]) as srv:
        yield srv


class CapturingTransport(httpx.HTTPTransport):
    """Records every byte the client puts on the wire (request line, headers, body)."""

    def __init__(self):
        super().__init__()
        self.sent = bytearray()

    def handle_request(self, request):
        request.read()
        self.sent += f"{request.method} {request.url}\r\n".encode()
        for name, value in request.headers.raw:
            self.sent += name + b": " + value + b"\r\n"
        self.sent += request.content
        return super().handle_request(request)


@pytest.fixture(scope="module")
def capture():
    return CapturingTransport()


@pytest.fixture(scope="module")
def client(server, capture):
    """The module's SDK client; every byte it sends in every test is captured for the secret-key test (last)."""
    with Client(server.url, token=TOKEN, transport=capture) as c:
        yield c


@pytest.fixture(scope="module")
def images(data_dir):
    return load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images[:24]


def plain_labels(images, model="pneumoniamnist"):
    artifact = load_artifact(model)
    logits = predict_logits(artifact.model, model_inputs(artifact, np.asarray(images)))
    return [artifact.labels[i] for i in logits.argmax(axis=1)]


def http(server, method, path, token=TOKEN, **kw):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, server.url + path, headers=headers, timeout=120, **kw)


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"], body


# -- discovery ------------------------------------------------------------------------------------------------------
def test_health_ready_and_model_listing(server):
    assert http(server, "GET", "/v1/health", token=None).json()["status"] == "ok"
    assert http(server, "GET", "/v1/ready", token=None).json()["ready"] is True
    models = {m["id"]: m for m in http(server, "GET", "/v1/models").json()["models"]}
    assert set(models) == {"pneumoniamnist", "tiny", "covid-cxr"}
    m = models["pneumoniamnist"]
    assert m["scheme"] == "ckks" and m["spec"]["scheme"] == "ckks"
    assert m["task"] == "binary-class" and m["labels"] == ["normal", "pneumonia"]
    assert m["preprocessing"]["size"] == 28 and m["metrics"]["test"]["acc"] > 0.8
    assert m["endpoints"]["infer"] == "/v1/models/pneumoniamnist/infer"
    stage = models["covid-cxr"]["client_stage"]
    assert models["covid-cxr"]["scheme"] == "paillier" and stage["arch"] == "mobilenetv2-he"
    weights = http(server, "GET", stage["weights_url"])
    assert weights.headers["content-type"] == protocol.OCTET and len(weights.content) == stage["weights_bytes"]
    assert_error(http(server, "GET", protocol.client_stage_path("pneumoniamnist")), 404, "no_client_stage")
    assert_error(http(server, "GET", "/openapi.json", token=None), 401, "unauthorized")  # behind the token too
    openapi = http(server, "GET", "/openapi.json").json()
    infer = openapi["paths"]["/v1/models/{model_id}/infer"]["post"]
    assert protocol.OCTET in infer["requestBody"]["content"]
    assert protocol.OCTET in infer["responses"]["200"]["content"]


# -- the acceptance criterion: encrypted predictions equal plaintext predictions -------------------------------------
def test_sdk_predictions_equal_plaintext(client, images):
    results = client.diagnose_many(list(images[:6]), progress=False, model="pneumoniamnist")
    assert [r.label for r in results] == plain_labels(images[:6])
    for r in results:
        assert abs(sum(r.probabilities.values()) - 1) < 1e-9 and r.task == "binary-class"


def test_paillier_model_with_client_stage(client, data_dir):
    """Another scheme through the same endpoints: the SDK downloads the public extractor, runs it, encrypts."""
    paths = sorted((data_dir / "covid19_radiography_subset").rglob("*.png"))[::97][:2]
    results = client.diagnose_many(paths, model="covid-cxr", progress=False)
    assert [r.label for r in results] == plain_labels([read_image(p) for p in paths], "covid-cxr")
    assert client.session("covid-cxr").stage is not None


def test_cli_predict_png_jpeg_dicom(server, images, tmp_path, capsys, monkeypatch):
    paths = []
    for i, fmt in enumerate(["png", "jpg", "dcm"]):
        path = tmp_path / f"scan{i}.{fmt}"
        big = np.asarray(Image.fromarray(images[i + 6]).resize((64, 64), Image.Resampling.BICUBIC))
        if fmt == "dcm":
            write_dicom(path, big.astype(np.uint16) * 16, bits=12)
        else:
            Image.fromarray(big).save(path)
        paths.append(str(path))
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    assert medhe_main(["predict", "--server", server.url, "--model", "pneumoniamnist", "--json", *paths]) == 0
    out = json.loads(capsys.readouterr().out)
    got = [r["label"] for r in out["results"]]
    assert [r["source"] for r in out["results"]] == paths
    assert got == plain_labels([read_image(p) for p in paths])
    # a bad file: one-line error, exit 2, before any key is generated
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert medhe_main(["predict", "--server", server.url, str(tmp_path / "broken.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_predict_refuses_a_result_outside_the_plans_range(server, tmp_path, capsys, monkeypatch):
    """A checkerboard is no radiograph: its logits (~800) leave the range the CKKS plan is sized for (~281), where
    an encrypted result could have wrapped around. The client says so, naming the file, instead of a diagnosis."""
    path = tmp_path / "checkerboard.png"
    Image.fromarray((np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)).save(path)
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    # the input checks refuse a checkerboard by default; --allow-unusual sends it, to reach the range check
    assert medhe_main(["predict", "--server", server.url, "--model", "pneumoniamnist", str(path)]) == 2
    assert "looks unlike the model's training data" in capsys.readouterr().err
    assert medhe_main(["predict", "--server", server.url, "--model", "pneumoniamnist", "--allow-unusual",
                       str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: the decrypted scores reach") and "no diagnosis is given" in err


# -- security --------------------------------------------------------------------------------------------------------
def _objects(root, depth=3):
    """Every object reachable from ``root`` through attributes, lists and dicts (bounded depth)."""
    seen, todo = set(), [(root, 0)]
    while todo:
        obj, d = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if d >= depth:
            continue
        children = []
        if isinstance(obj, dict):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            children = list(obj)
        elif hasattr(obj, "__dict__"):
            children = list(vars(obj).values())
        todo += [(c, d + 1) for c in children]


def secret_key_material(session) -> list[bytes]:
    """The client's secret key, serialized by the backend library itself (SEAL or phe)."""
    from phe import PaillierPrivateKey

    objs = list(_objects(session))
    private = [o for o in objs if isinstance(o, PaillierPrivateKey)]
    if private:
        forms = []
        for key in private:
            for value in (key.p, key.q, key.hp, key.hq, key.p_inverse):
                n = (value.bit_length() + 7) // 8
                forms += [value.to_bytes(n, "big"), value.to_bytes(n, "little"), str(value).encode()]
        return forms
    return _seal_secret_material(objs)


def _seal_secret_material(objs) -> list[bytes]:
    """SEAL's secret key: its raw 64-bit RNS words and the per-prime bit-packed form of the compact wire format."""
    import seal

    from medhe.he.ckks.wire.bits import pack_bits

    keys = [o for o in objs if isinstance(o, seal.SecretKey)]
    contexts = [o for o in objs if isinstance(o, seal.SEALContext)]
    assert keys and contexts, "could not find the SEAL secret key in the client session"
    parms = contexts[0].key_context_data().parms()
    n, primes = parms.poly_modulus_degree(), parms.coeff_modulus()
    forms = []
    for key in keys:
        raw = key.to_string()
        data = raw[len(raw) - 8 * n * len(primes):]  # the key polynomial, one 64-bit word per RNS coefficient
        assert len(data) == 8 * n * len(primes)
        forms.append(data)
        words = np.frombuffer(data, dtype="<u8").reshape(len(primes), n)
        for row, q in zip(words, primes):
            forms.append(pack_bits(row, q.bit_count()))
    return forms


class SecretIndex:
    """Finds any ``window``-byte slice of any of ``secrets`` (at any offset) in a haystack (at any offset). Exact.

    Such an occurrence covers a haystack position q that is a multiple of 16 with q + 8 inside the match, so the
    8-byte word at q is a secret's word at some offset. The index holds the secrets' words at every offset; a
    search looks up the haystack's words at multiples of 16 (a bitmap prefilter, then exact membership) and
    extends each hit byte by byte to see whether the match reaches ``window`` bytes. Linear in the haystack.
    """

    def __init__(self, secrets: list[bytes], window: int = 32):
        assert window >= 24, "a window must cover a whole word at a multiple of 16"
        self.secrets, self.window = secrets, window
        vals, where = [], []
        for k, secret in enumerate(secrets):
            for o in range(8):
                count = (len(secret) - o) // 8
                if count > 0:
                    vals.append(np.frombuffer(secret, dtype="<u8", count=count, offset=o))
                    where.append(np.stack([np.full(count, k), np.arange(count, dtype=np.int64) * 8 + o], axis=1))
        vals, where = np.concatenate(vals), np.concatenate(where)
        order = np.argsort(vals, kind="stable")
        self.vals, self.where = vals[order], where[order]
        self.table = np.zeros(1 << 24, dtype=bool)
        self.table[(self.vals & 0xFFFFFF).astype(np.intp)] = True

    def found_in(self, haystack: bytes) -> bool:
        hay, window = bytes(haystack), self.window
        words = np.frombuffer(hay, dtype="<u8", count=len(hay) // 8)[::2]
        pos = np.flatnonzero(self.table[(words & 0xFFFFFF).astype(np.intp)])
        pos = pos[np.isin(words[pos], self.vals)]
        for q in (pos * 16).tolist():
            w = np.frombuffer(hay, dtype="<u8", count=1, offset=q)[0]
            lo, hi = np.searchsorted(self.vals, w, "left"), np.searchsorted(self.vals, w, "right")
            for k, p in self.where[lo:hi].tolist():
                secret = self.secrets[k]
                left = 0
                while left < window and q - left > 0 and p - left > 0 and hay[q - left - 1] == secret[p - left - 1]:
                    left += 1
                right = 8
                while right < window and q + right < len(hay) and p + right < len(secret) \
                        and hay[q + right] == secret[p + right]:
                    right += 1
                if left + right >= window:
                    return True
        return False


def test_bearer_token_required(server):
    assert_error(http(server, "GET", "/v1/models", token=None), 401, "unauthorized")
    assert_error(http(server, "GET", "/v1/models", token="wrong"), 401, "unauthorized")
    with pytest.raises(ServiceError, match="401"):
        Client(server.url, token="wrong").models()


# -- bad input: every case is a 4xx JSON error and the server keeps serving ----------------------------------------
@pytest.fixture(scope="module")
def good(client, images):
    """A registered session and a valid ciphertext, to prove the server still answers after each bad request."""
    sess = client.session("pneumoniamnist")
    ct = sess.he.encrypt(sess.inputs(images[0]))
    expected = plain_labels(images[:1])[0]

    def check():
        out = client.infer_encrypted(sess, ct)
        assert sess.info["labels"][int(np.argmax(sess.he.decrypt(out)))] == expected
    return sess, ct, check


def infer(server, model, key_id, body, ctype=protocol.OCTET, secret=None, **kw):
    headers = {"Content-Type": ctype}
    if key_id is not None:
        headers[protocol.KEY_HEADER] = key_id
    if secret is not None:
        headers[protocol.KEY_SECRET_HEADER] = secret
    return http(server, "POST", protocol.infer_path(model), content=body, headers=headers, **kw)


def test_bad_ciphertexts_are_422(server, good):
    sess, ct, check = good
    rng = np.random.default_rng(0)
    cases = {
        "garbage": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "truncated": ct[: len(ct) // 2],
        "bit flip": ct[:-100] + bytes([ct[-100] ^ 0xFF]) + ct[-99:],
        "trailing bytes": ct + b"\0" * 16,
    }
    for name, body in cases.items():
        assert_error(infer(server, "pneumoniamnist", sess.key_id, body, secret=sess.key_secret), 422, "bad_ciphertext")
    check()


def test_other_models_keys_and_ciphertexts_are_refused(server, client, good, images):
    sess, ct, check = good
    tiny = client.session("tiny")
    tiny_ct = tiny.he.encrypt(tiny.inputs(images[0]))
    # a ciphertext for another model (other parameters / plan) under the right keys
    assert_error(infer(server, "pneumoniamnist", sess.key_id, tiny_ct, secret=sess.key_secret), 422, "bad_ciphertext")
    # another model's evaluation keys registered here
    r = http(server, "POST", protocol.keys_path("pneumoniamnist"), content=tiny.evaluation_keys(),
             headers={"Content-Type": protocol.OCTET})
    assert_error(r, 422, "bad_ciphertext")
    # a key id registered for another model
    assert_error(infer(server, "pneumoniamnist", tiny.key_id, ct, secret=tiny.key_secret), 422, "key_model_mismatch")
    check()
    # and the tiny model itself works with its own keys
    assert tiny.info["labels"][int(np.argmax(tiny.he.decrypt(client.infer_encrypted(tiny, tiny_ct))))] in \
        tiny.info["labels"]


def test_unknown_ids_content_types_and_empty_bodies(server, good):
    sess, ct, check = good
    secret = sess.key_secret
    assert_error(infer(server, "pneumoniamnist", "no-such-key", ct, secret=secret), 404, "unknown_key")
    assert_error(infer(server, "pneumoniamnist", None, ct), 400, "missing_key_id")
    assert_error(infer(server, "pneumoniamnist", sess.key_id, ct), 400, "missing_key_secret")
    assert_error(infer(server, "no-such-model", sess.key_id, ct, secret=secret), 404, "unknown_model")
    assert_error(infer(server, "pneumoniamnist", sess.key_id, b"", secret=secret), 400, "empty_body")
    assert_error(infer(server, "pneumoniamnist", sess.key_id, json.dumps({"ct": "AAAA"}), ctype="application/json",
                       secret=secret), 415, "unsupported_media_type")
    assert_error(http(server, "POST", protocol.keys_path("pneumoniamnist"), content=b"x" * 100,
                      headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    assert_error(http(server, "POST", protocol.keys_path("pneumoniamnist"), content=b"x" * 100,
                      headers={"Content-Type": protocol.OCTET}), 422, "bad_ciphertext")
    assert_error(http(server, "GET", "/v1/nothing-here"), 404, "not_found")
    assert_error(http(server, "DELETE", protocol.key_path("no-such-key"),
                      headers={protocol.KEY_SECRET_HEADER: secret}), 404, "unknown_key")
    check()


def _raw_request(server, head: bytes, body_chunks) -> bytes:
    """Speak HTTP/1.1 on a socket so an oversize body can be refused mid-stream without the client choking."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused and closed: exactly what we want; read its answer
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
    return data


def test_oversize_bodies_are_413_without_buffering(server, good):
    sess, ct, check = good
    path = protocol.infer_path("pneumoniamnist")
    common = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
              f"Content-Type: {protocol.OCTET}\r\n{protocol.KEY_HEADER}: {sess.key_id}\r\n"
              f"{protocol.KEY_SECRET_HEADER}: {sess.key_secret}\r\n")
    # declared 2 GB: refused from the header, before the body arrives
    reply = _raw_request(server, (common + "Content-Length: 2000000000\r\n\r\n").encode(), [b"\0" * 65536])
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply
    # chunked, no length: a body that starts like this model's input but whose first part declares more bytes
    # than the limit is refused from that declaration, while the rest is still streaming
    head = ct[:24] + (MAX_BODY * 2).to_bytes(4, "little") + ct[28:28 + 32]
    chunk = b"\0" * (1 << 20)
    frames = [f"{len(head):x}\r\n".encode() + head + b"\r\n"]
    frames += [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(MAX_BODY // len(chunk) + 4)]
    reply = _raw_request(server, (common + "Transfer-Encoding: chunked\r\n\r\n").encode(), frames)
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply
    # and zeros are refused at their first bytes (not a CKKS message), long before any limit
    frames = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(MAX_BODY // len(chunk) + 4))
    reply = _raw_request(server, (common + "Transfer-Encoding: chunked\r\n\r\n").encode(), frames)
    assert reply.startswith(b"HTTP/1.1 422") and b"bad_ciphertext" in reply
    check()


# -- concurrency -----------------------------------------------------------------------------------------------------
def test_concurrent_clients_do_not_corrupt_each_other(server, images):
    expected = [0 if lab == "normal" else 1 for lab in plain_labels(images[:8])]
    result = run_load_test(server.url, "pneumoniamnist", clients=2, requests=6, images=images[:8],
                           expected=expected, token=TOKEN)
    assert result["failures"] == 0, result["errors"]
    assert result["mismatches"] == 0
    assert result["latency_ms"]["p50"] > 0 and result["throughput_rps"] > 0
    assert http(server, "GET", "/v1/ready", token=None).json()["ready"] is True


def test_health_answers_while_inference_runs(server, client, good):
    sess, ct, check = good
    done = threading.Event()
    errors = []

    def busy():
        try:
            for _ in range(2):
                client.infer_encrypted(sess, ct)
        except MedheError as exc:  # pragma: no cover - reported below
            errors.append(exc)
        done.set()

    t = threading.Thread(target=busy)
    t.start()
    answered = 0
    while not done.is_set():
        assert http(server, "GET", "/v1/health", token=None, ).status_code == 200
        answered += 1
    t.join()
    assert not errors and answered >= 1


# -- last: everything the module client sent ------------------------------------------------------------------
def test_secret_key_never_leaves_the_client(client, capture, images):
    """Runs last: the module client has by now registered keys, diagnosed, sent bad input and deleted keys."""
    results = [client.diagnose(images[0], model="pneumoniamnist")]
    sessions = [client.session(m) for m in ("pneumoniamnist", "tiny", "covid-cxr")]
    secrets = [form for sess in sessions for form in secret_key_material(sess.he)]
    client.forget_keys()
    sent = bytes(capture.sent)
    assert len(sent) > sum(sess.key_bytes for sess in sessions) > 0  # we really captured the uploads
    assert min(len(form) for form in secrets) >= 32
    index = SecretIndex(secrets)
    for form in secrets:  # the detector works, at any offset ...
        assert index.found_in(b"\x01" * 7 + form[len(form) // 3:][:32] + b"x")
    assert not index.found_in(sent)  # ... and finds nothing in the traffic
    # decrypted results are never sent back: neither the logits' text nor their float64 bytes appear
    for r in results:
        for v in r.logits:
            assert repr(v).encode() not in sent and np.float64(v).tobytes() not in sent
