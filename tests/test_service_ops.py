"""Operations: ``medhe serve --config medhe.toml`` with JSON logs and an audit log, driven by the SDK with real
encryption, and the config loader's one-line errors.

One server (in-process worker, the small pneumoniamnist model) is configured by a TOML file only; the tests then
read back what it wrote: an audit line for the key registration, the inference, the refusals and the deletion,
JSON log lines that parse, and, in every log it produced, none of the secret key's public counterpart bytes, the
ciphertext, the encrypted result, the image, the decrypted logits, the key secret or the bearer token.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import datetime, timezone

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from medhe.cli import build_parser, main as medhe_main
from medhe.cli._config import apply_config
from medhe.data import load_dataset
from medhe.errors import MedheError
from medhe.models.artifact import read_card, resolve_model_dir
from medhe.service import protocol
from medhe.service.audit import FIELDS, AuditLog
from medhe.service.client import Client
from medhe.service.launch import ServerProcess
from medhe.service.logs import JsonFormatter

MODEL = "pneumoniamnist"
TOKEN = "ops-token-3b9e51"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    return {"config": root / "medhe.toml", "log": root / "serve.log", "audit": root / "audit.log"}


@pytest.fixture(scope="module")
def server(files):
    """Everything from the file (port = 1 is overridden by ServerProcess's --port: flags win); --log-level info on
    the command line so uvicorn's access lines are written too."""
    files["config"].write_text(f"""
models = ["{MODEL}"]
workers = 0
port = 1
token = "{TOKEN}"
log_format = "json"
log_file = "{files['log']}"
audit_log = "{files['audit']}"
max_keys_per_client = 8
""")
    with ServerProcess([], extra_args=["--config", str(files["config"]), "--log-level", "info"]) as srv:
        yield srv


class Recording(httpx.HTTPTransport):
    """Keeps the body the SDK sent to each path (the evaluation keys are serialized afresh on every call)."""

    def __init__(self):
        super().__init__()
        self.bodies: dict[str, bytes] = {}

    def handle_request(self, request):
        self.bodies[request.url.path] = request.read()
        return super().handle_request(request)


@pytest.fixture(scope="module")
def traffic(server, data_dir):
    """A registration, an inference, three refusals and a deletion; returns every secret-ish byte string seen."""
    image = load_dataset(MODEL, split="test", size=28, data_dir=data_dir).images[0]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    transport = Recording()
    with Client(server.url, token=TOKEN, transport=transport) as client:
        sess = client.session(MODEL)  # registers the evaluation keys
        keys = transport.bodies[protocol.keys_path(MODEL)]
        assert len(keys) == sess.key_bytes
        ciphertext = sess.he.encrypt(sess.inputs(image))
        encrypted_out = client.infer_encrypted(sess, ciphertext)
        logits = np.asarray(sess.he.decrypt(encrypted_out), dtype=float)
        key_id, key_secret = sess.key_id, sess.key_secret
        refusals = {
            "unknown_model": httpx.post(f"{server.url}{protocol.infer_path('nope')}", headers=auth, content=b"x"),
            "bad_ciphertext": httpx.post(f"{server.url}{protocol.infer_path(MODEL)}", content=b"\0" * 4096,
                                         headers={**auth, **sess.key_headers(), "Content-Type": protocol.OCTET}),
            "unauthorized": httpx.get(f"{server.url}{protocol.models_path()}"),
        }
        client.forget_keys()
    for code, response in refusals.items():
        assert response.json()["error"]["code"] == code, response.text
    return {"image": np.asarray(image), "keys": keys, "ciphertext": ciphertext, "out": encrypted_out,
            "logits": logits, "key_id": key_id, "key_secret": key_secret}


def audit_lines(path, want: int, timeout: float = 10.0) -> list[dict]:
    """The audit log's records once it holds ``want`` of them (a line is written just after its answer)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= want or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


@pytest.mark.slow  # one server process, real CKKS (about 10 s)
def test_audit_log_records_registration_inference_refusals_and_deletion(server, traffic, files):
    records = audit_lines(files["audit"], 6)
    version = str(read_card(resolve_model_dir(MODEL)).get("version", "unknown"))
    by_event = {}
    for r in records:
        assert list(r) == list(FIELDS), r  # every line has the same fields, in order
        datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
        assert r["time"].endswith("Z") and r["client"] == "127.0.0.1"
        by_event.setdefault(r["event"], []).append(r)
    reg, = by_event["register_keys"]
    assert reg["key_id"] == traffic["key_id"] and reg["model"] == f"{MODEL}@{version}"
    assert reg["route"] == f"POST {protocol.keys_path('{model}')}" and reg["status"] == 201
    assert reg["outcome"] == "ok" and reg["request_bytes"] == len(traffic["keys"])
    inf, = by_event["inference"]
    assert inf["key_id"] == traffic["key_id"] and inf["model"] == f"{MODEL}@{version}" and inf["status"] == 200
    assert inf["request_bytes"] == len(traffic["ciphertext"]) and inf["response_bytes"] == len(traffic["out"])
    refused = {r["outcome"]: r for r in by_event["refused"]}
    assert set(refused) == {"unknown_model", "bad_ciphertext", "unauthorized"}
    assert refused["unknown_model"]["model"] == "nope@unknown" and refused["unknown_model"]["status"] == 404
    assert refused["bad_ciphertext"]["action"] == "inference" and refused["bad_ciphertext"]["status"] == 422
    assert refused["bad_ciphertext"]["key_id"] == traffic["key_id"]
    assert refused["unauthorized"]["action"] == "list_models" and refused["unauthorized"]["status"] == 401
    gone, = by_event["delete_keys"]
    assert gone["key_id"] == traffic["key_id"] and gone["status"] == 204
    assert not [r for r in records if "/ready" in r["route"] or "/health" in r["route"]]  # probes are not audited


@pytest.mark.slow  # one server process, real CKKS (about 10 s)
def test_json_log_lines_parse_and_carry_uvicorns_access_lines(server, traffic, files):
    lines = files["log"].read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert records
    for r in records:
        assert {"time", "level", "logger", "message", "event"} <= set(r), r
        assert datetime.fromisoformat(r["time"].replace("Z", "+00:00")).tzinfo == timezone.utc
    access = [r for r in records if r["event"] == "http_access"]
    assert any(r["path"] == protocol.infer_path(MODEL) and r["status"] == 200 and r["method"] == "POST"
               for r in access)
    assert all(r["logger"] == "uvicorn.access" for r in access)
    assert any(r["event"] == "ready" and r["url"].startswith(server.url) for r in records)
    assert "Traceback" not in server.log()  # nothing else went to stderr but plain lines


def _forms(data: bytes, n: int = 4, width: int = 48) -> list[bytes]:
    """Slices of ``data`` as they could appear in a text log: raw, base64, hex."""
    step = max(1, (len(data) - width) // n)
    slices = [data[i:i + width] for i in range(0, max(1, len(data) - width), step)][:n]
    return [f for s in slices for f in (s, base64.b64encode(s), s.hex().encode())]


@pytest.mark.slow  # one server process, real CKKS (about 10 s)
def test_no_image_ciphertext_key_secret_or_logit_in_any_log(server, traffic, files):
    audit_lines(files["audit"], 6)
    logs = {"audit": files["audit"].read_bytes(), "json log": files["log"].read_bytes(),
            "stderr": server.log_path.read_bytes()}
    secrets = {"key secret": [traffic["key_secret"].encode()], "token": [TOKEN.encode()],
               "keys": _forms(traffic["keys"]), "ciphertext": _forms(traffic["ciphertext"]),
               "encrypted result": _forms(traffic["out"]), "image": _forms(traffic["image"].tobytes(), width=32),
               "logits": [repr(traffic["logits"].tolist()).encode()]
               + [repr(float(v)).encode() for v in traffic["logits"]]}
    for where, text in logs.items():
        for what, forms in secrets.items():
            assert not any(f in text for f in forms), f"{what} appears in the {where}"
    # sizes only: the audit line names the ciphertext by its length
    assert str(len(traffic["ciphertext"])).encode() in logs["audit"]


# -- unit tests: no server ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ("prot = 8000\n", ["unknown key 'prot'", "did you mean 'port'"]),
    ("port = \"8000\"\n", ["port = '8000'", "expected an integer"]),
    ("log_format = \"xml\"\n", ["log_format", "'text', 'json'"]),
    ("max_body = \"lots\"\n", ["max_body", "not a size"]),
    ("models = [\"pneumoniamnist\", 3]\n", ["models", "a list of strings"]),
    ("key_ttl = true\n", ["key_ttl = true", "a number"]),
    ("[serve]\nport = 8000\n", ["unknown key 'serve'"]),
    ("port = \n", ["not valid TOML"]),
    ("model = [\"a\"]\nmodels = [\"b\"]\n", ["set the same option"]),
])
def test_config_errors_are_one_line_naming_key_and_file(text, words, tmp_path, capsys):
    path = tmp_path / "medhe.toml"
    path.write_text(text)
    assert medhe_main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err
    for word in words:
        assert word in err, err


def test_config_missing_file_and_abbreviated_flag(tmp_path, capsys):
    assert medhe_main(["ui", "--config", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err == f"error: config file not found: {tmp_path / 'none.toml'}\n"
    (tmp_path / "bad.toml").write_text('server = "http://127.0.0.1:9"\nport = 0\ncolor = 1\n')
    assert medhe_main(["ui", "--conf", str(tmp_path / "bad.toml")]) == 2  # argparse's abbreviation, read too
    assert "unknown key 'color'" in capsys.readouterr().err


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "medhe.toml"
    path.write_text('models = ["a", "b"]\nport = 9000\nmax_key_bytes = "1G"\nlog_format = "json"\nray = true\n')

    def parse(*argv):
        parser = build_parser()
        assert apply_config(parser, list(argv)) == str(path)
        return parser.parse_args(list(argv))

    args = parse("serve", "--config", str(path))
    assert (args.model, args.port, args.max_key_bytes, args.log_format, args.ray) == (["a", "b"], 9000, 1 << 30,
                                                                                       "json", "")
    args = parse("serve", "--port", "8001", f"--config={path}", "--model", "c", "--log-format", "text")
    assert (args.model, args.port, args.log_format) == (["c"], 8001, "text")  # the command line's list replaces
    ui = tmp_path / "ui.toml"
    ui.write_text('server = "http://10.0.0.5:8000"\nport = 8766\nlog_file = "ui.log"\n')  # --server from the file
    parser = build_parser()
    apply_config(parser, ["ui", "--config", str(ui)])
    args = parser.parse_args(["ui", "--config", str(ui)])
    assert (args.server, args.port, args.log_file) == ("http://10.0.0.5:8000", 8766, "ui.log")


def test_a_failing_audit_write_is_logged_once_and_never_raises(caplog):
    audit = AuditLog("/dev/full")  # every write: ENOSPC
    with caplog.at_level(logging.ERROR, logger="medhe.service.audit"):
        for _ in range(3):
            audit.write({"event": "inference"})
    audit.close()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert "write failed" in caplog.records[0].getMessage()


def test_an_unopenable_audit_log_is_one_line(tmp_path):
    with pytest.raises(MedheError, match="cannot open --audit-log"):
        AuditLog(tmp_path / "missing-dir" / "audit.log")


def test_audit_lines_are_whole_appended_lines(tmp_path):
    path = tmp_path / "audit.log"
    path.write_text('{"earlier": 1}\n')
    audit = AuditLog(path)
    audit.write({"event": "inference", "note": "line\nbreak"})
    audit.close()
    first, second = path.read_text().splitlines()
    assert json.loads(first) == {"earlier": 1} and json.loads(second)["note"] == "line\nbreak"


def test_json_formatter_fields():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "POST", "/v1/x", "1.1", 200), None)
    out = json.loads(JsonFormatter().format(record))
    assert out["event"] == "http_access" and out["status"] == 200 and out["path"] == "/v1/x"
    assert out["message"] == '127.0.0.1:5 - "POST /v1/x HTTP/1.1" 200' and out["time"].endswith("Z")


def test_the_documented_medhe_toml_is_valid(tmp_path):
    from pathlib import Path

    from medhe.cli._config import _subparser, load_config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    block = doc.split("# medhe.toml: medhe serve --config medhe.toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "medhe.toml").write_text(block)
    values = load_config(tmp_path / "medhe.toml", _subparser(build_parser(), "serve"))
    assert values["model"] == ["pneumoniamnist", "covid-cxr:paillier"] and values["max_key_bytes"] == 4 << 30
    assert values["audit_log"] and values["log_format"] == "json"


def test_logging_set_up_is_undone(tmp_path):
    """``medhe serve`` run in-process (tests, notebooks) gives logging back as it found it, so caplog still works."""
    from medhe.service.logs import configure, reset

    before = [(logging.getLogger(n).propagate, logging.getLogger(n).level, list(logging.getLogger(n).handlers))
              for n in ("medhe", "uvicorn", "medhe.cli")]
    say = configure("json", str(tmp_path / "x.log"), "debug")
    say("hello", "greeting", who="ops")
    assert json.loads((tmp_path / "x.log").read_text())["who"] == "ops"
    reset()
    after = [(logging.getLogger(n).propagate, logging.getLogger(n).level, list(logging.getLogger(n).handlers))
             for n in ("medhe", "uvicorn", "medhe.cli")]
    assert after == before


def test_middleware_audits_batch_routes_crashes_and_unknown_routes(tmp_path):
    """The batch routes, an internal error and a route that does not exist, without starting a server."""
    import asyncio

    from medhe.service.audit_middleware import AuditMiddleware

    app = FastAPI()

    @app.post(protocol.batch_keys_path("{model_id}"), status_code=201)
    async def batch_keys(model_id: str, request: Request) -> dict:
        await request.body()
        return {"key_id": "bk-1", "key_secret": "never-logged-secret", "model": model_id}

    @app.post(protocol.batch_infer_path("{model_id}"))
    async def batch_infer(model_id: str) -> Response:
        raise RuntimeError("boom")

    @app.get(protocol.models_path())
    async def listing() -> JSONResponse:
        return JSONResponse({"models": []})

    audit = AuditLog(tmp_path / "audit.log")
    app.add_middleware(AuditMiddleware, audit=audit, version_of=lambda m: "7" if m == MODEL else None)
    async def requests() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [(await http.post(protocol.batch_keys_path(MODEL), content=b"k" * 10)).status_code,
                    (await http.post(protocol.batch_infer_path(MODEL), content=b"c" * 5,
                                     headers={protocol.KEY_HEADER: "bk-1"})).status_code,
                    (await http.get(protocol.models_path())).status_code,  # a plain listing: not audited
                    (await http.get("/v1/nowhere")).status_code]

    assert asyncio.run(requests()) == [201, 500, 200, 404]
    audit.close()
    text = (tmp_path / "audit.log").read_text()
    keys, crash, nowhere = (json.loads(line) for line in text.splitlines())
    assert (keys["event"], keys["key_id"], keys["model"], keys["request_bytes"]) == ("register_batch_keys", "bk-1",
                                                                                    f"{MODEL}@7", 10)
    assert (crash["event"], crash["action"], crash["outcome"], crash["status"], crash["key_id"]) == (
        "refused", "batch", "internal_error", 500, "bk-1")
    assert (nowhere["event"], nowhere["action"], nowhere["route"], nowhere["status"]) == (
        "refused", None, "GET /v1/nowhere", 404)
    assert "never-logged-secret" not in text
