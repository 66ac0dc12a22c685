"""Every scheme's `medhe evaluate` report has the one shared shape (docs/reports.md), with real encryption."""

import json

import pytest

from medhe.cli.evaluate import dumps, evaluate
from medhe.he.report import SCHEMA, check_provenance, check_report
from medhe.models.artifact import read_card, resolve_model_dir
from medhe.revision import code_revision
from medhe.stats import STAT_KEYS, summarize

CASES = [("ckks", "pneumoniamnist", {}), ("tfhe", "pneumoniamnist-qfcnn", {"fhe": "simulate"}),
         ("paillier", "covid-cxr", {"key_bits": 3072}),
         # the two other CKKS modes write the same schema: batch mode and the encrypted-weight model (P3)
         ("ckks", "pneumoniamnist", {"batch": True}), ("ckks", "pneumoniamnist", {"encrypted_model": True})]
IDS = ["ckks", "tfhe", "paillier", "ckks-batch", "ckks-encrypted-model"]


def _encrypted_model_dirs(root):
    """A real KEYDIR and ENCDIR for the default model, made as medhe keygen / encrypt-model make them."""
    from medhe.he.ckks import compile_ckks
    from medhe.he.ckks.encrypted.keys import create_keydir
    from medhe.he.ckks.encrypted.model import spec_for, write_encrypted_model
    from medhe.models.artifact import load_artifact

    artifact = load_artifact("pneumoniamnist")
    plan = compile_ckks(artifact).plan
    keys = create_keydir(spec_for(plan, artifact.card), root / "keys")
    write_encrypted_model(plan, artifact.card, keys, root / "enc", progress=False)
    return str(root / "enc"), str(root / "keys")


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def report(request, data_dir, tmp_path_factory):
    scheme, model, options = request.param
    if options.get("encrypted_model"):
        encdir, keydir = _encrypted_model_dirs(tmp_path_factory.mktemp("p3"))
        options = {"encrypted_model": encdir, "keys": keydir}
    return json.loads(dumps(evaluate(model, scheme, limit=8, data_dir=str(data_dir), progress=False, **options)))


@pytest.mark.slow
def test_report_has_the_shared_schema(report):
    assert check_report(report) == []
    assert report["schema"] == SCHEMA
    assert report["params"]["security_bits"] >= 112 if report["scheme"] == "paillier" else \
        report["params"]["security_bits"] >= 128
    assert len(report["logits"]["plain"]) == report["n"] == 8
    assert len(report["logits"]["labels"]) == report["n"]
    # which model and code produced it (model cards v2): the card's version and revision, this checkout's revision
    card = read_card(resolve_model_dir(report["model"]))
    assert report["model_version"] == report["provenance"]["model_version"] == card["version"]
    assert report["provenance"]["model_code_revision"] == card["code_revision"]
    assert report["provenance"]["code_revision"] == code_revision() and report["provenance"]["weights_sha256"]


@pytest.mark.slow
def test_plain_is_the_float_model_and_tfhe_simulate_says_so(report):
    if report["scheme"] == "tfhe":
        assert report["encrypted"] is None and isinstance(report["simulated"], dict)
        assert report["reference"] == "quantized" and "quantized" in report
        assert report["latency_ms"]["keygen"] is None and set(report["latency_ms"]["eval"]) == set(STAT_KEYS)
        assert report["params"]["backend"] == "concrete-simulate"
    else:
        assert report["reference"] == "plain" and report["agreement"] >= 0.99
        for stage in ("keygen", "encrypt", "eval", "decrypt"):
            assert report["latency_ms"][stage]["median"] > 0
        assert report["bytes"]["input_ciphertext"] > 0 and report["bytes"]["evaluation_keys"] > 0
        assert len(report["logits"]["encrypted"]) == report["n"]
    if report.get("mode") == "batch":  # one sample per ciphertext batch: 8 images fill one
        assert report["latency_ms"]["eval"]["n"] == report["batch"]["batches"] == 1
        assert report["params"]["backend"].startswith("batch-kernel+")
    if report.get("mode") == "encrypted-model":
        assert report["bytes"]["encrypted_model"] > 0
        assert check_report({**report, **report["plaintext_weights"]}) == []  # the baseline has the same shape


@pytest.mark.slow
def test_clinical_block_per_logit_set(report):
    """Plain and what ran encrypted (TFHE simulate: simulated; plus the quantized reference) each get the
    clinician's view of the same eight images, the finding as positive class."""
    c = report["clinical"]
    expected = {"plain", "simulated", "quantized"} if report["scheme"] == "tfhe" else {"plain", "encrypted"}
    assert set(c) == expected
    positive = "COVID" if report["model"] == "covid-cxr" else "pneumonia"
    for block in c.values():
        assert block["kind"] == "binary" and block["positive"]["label"] == positive and block["n"] == 8
        cm = block["confusion"]
        assert cm["tp"] + cm["fn"] + cm["fp"] + cm["tn"] == 8
        assert block["bootstrap"]["resamples"] == 1000 and block["threshold"]["probability"] == 0.5
    assert c["plain"]["acc"]["value"] == pytest.approx(report["plain"]["acc"], abs=1e-6)


def test_check_report_names_what_is_missing():
    assert "missing params" in check_report({"schema": SCHEMA})
    assert check_report({}) and all(p.startswith("missing ") for p in check_report({}))
    assert {"missing model_version", "missing provenance"} <= set(check_report({"schema": SCHEMA}))
    assert check_provenance({"model_version": "1", "provenance": {"model": "m", "model_version": "1"}}) == [
        "missing provenance.model_code_revision", "missing provenance.code_revision",
        "missing provenance.medhe_version", "missing provenance.weights_sha256"]


def test_one_p95_definition():
    s = summarize(list(range(1, 21)))
    assert set(s) == set(STAT_KEYS) and s["n"] == 20 and s["median"] == 10.5 and s["p95"] == pytest.approx(19.05)
    assert summarize([]) is None and summarize([4.0])["p95"] == 4.0


@pytest.mark.slow
def test_medhe_report_writes_markdown_and_plots(report, tmp_path):
    import re

    from PIL import Image

    from medhe.cli import main

    run = tmp_path / "run.json"
    run.write_text(json.dumps(report))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", md)
    kinds = {p.rsplit("-", 1)[1] for p in pngs}
    assert {"scatter.png", "latency.png"} <= kinds
    assert ("bytes.png" in kinds) == (report["encrypted"] is not None)
    assert "roc.png" in kinds or "single class" in md
    assert "### Clinician's view" in md and "(TP)" in md and "| specificity |" in md
    for name in pngs:
        with Image.open(tmp_path / "rep" / name) as img:
            assert img.format == "PNG" and min(img.size) > 200


def test_report_command_errors_are_one_line(tmp_path, capsys):
    from medhe.cli import main

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    assert "is a folder" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["report", str(bad), "--out", str(tmp_path / "no" / "such" / "dir")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(bad), "--out", str(tmp_path / "rep")]) == 2
    assert "not a medhe evaluate report" in capsys.readouterr().err
