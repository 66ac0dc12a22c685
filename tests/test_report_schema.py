"""Every scheme's `medhe evaluate` report has the one shared shape (docs/reports.md), with real encryption."""

import json

import pytest

from medhe.cli.evaluate import dumps, evaluate
from medhe.he.report import SCHEMA, check_report
from medhe.stats import STAT_KEYS, summarize

CASES = [("ckks", "pneumoniamnist", {}), ("tfhe", "pneumoniamnist-qfcnn", {"fhe": "simulate"}),
         ("paillier", "covid-cxr", {"key_bits": 2048})]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def report(request, data_dir):
    scheme, model, options = request.param
    return json.loads(dumps(evaluate(model, scheme, limit=8, data_dir=str(data_dir), progress=False, **options)))


@pytest.mark.slow
def test_report_has_the_shared_schema(report):
    assert check_report(report) == []
    assert report["schema"] == SCHEMA
    assert report["params"]["security_bits"] >= 112 if report["scheme"] == "paillier" else \
        report["params"]["security_bits"] >= 128
    assert len(report["logits"]["plain"]) == report["n"] == 8
    assert len(report["logits"]["labels"]) == report["n"]


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


def test_check_report_names_what_is_missing():
    assert "missing params" in check_report({"schema": SCHEMA})
    assert check_report({}) and all(p.startswith("missing ") for p in check_report({}))


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
