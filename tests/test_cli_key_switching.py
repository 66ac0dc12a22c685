"""``--key-switching {seal,hybrid}`` on the commands that compile a CKKS plan (issue 29): ``medhe inspect``,
``medhe evaluate --scheme ckks`` and ``medhe serve`` pass it to ``compile_plan(key_switching=...)``; shown in their
help; anything else is refused with one line. Real pneumoniamnist plans and test images (~15 s in all)."""

from __future__ import annotations

import json

import pytest

from medhe.cli import main as medhe_main


def inspect_json(capsys, *extra: str) -> dict:
    assert medhe_main(["inspect", "pneumoniamnist", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_compiles_the_chosen_key_format(capsys):
    hybrid = inspect_json(capsys, "--key-switching", "hybrid")
    seal = inspect_json(capsys, "--key-switching", "seal")
    default = inspect_json(capsys)
    assert hybrid["params"]["alpha"] >= 1 and hybrid["params"]["specials"] >= 1
    assert any("key switching: hybrid" in c for c in hybrid["choices"])
    assert "alpha" not in seal["params"] and not any("key switching: hybrid" in c for c in seal["choices"])
    assert default["params"] == seal["params"]  # SEAL's format stays the default
    assert medhe_main(["inspect", "pneumoniamnist", "--key-switching", "hybrid"]) == 0
    assert "key switching: hybrid" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["inspect", "pneumoniamnist"], ["evaluate"], ["serve"]])
def test_the_flag_is_in_the_help_and_other_values_are_refused(command, capsys):
    with pytest.raises(SystemExit):
        medhe_main([command[0], "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--key-switching {seal,hybrid}" in text and "hybrid (issue 29" in text
    with pytest.raises(SystemExit):
        medhe_main([*command, "--key-switching", "lattigo"])
    assert "invalid choice: 'lattigo'" in capsys.readouterr().err


def test_evaluate_runs_a_hybrid_plan_and_refuses_the_flag_elsewhere(tmp_path, data_dir, capsys):
    out = tmp_path / "report.json"
    assert medhe_main(["evaluate", "--model", "pneumoniamnist", "--scheme", "ckks", "--key-switching", "hybrid",
                       "--limit", "2", "--no-progress", "--data-dir", str(data_dir), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["params"]["key_switching"]["format"] == "hybrid" and report["params"]["backend"] == "native"
    assert report["n_encrypted"] == 2 and report["agreement"] == 1.0
    capsys.readouterr()
    assert medhe_main(["evaluate", "--model", "covid-cxr", "--scheme", "paillier", "--key-switching", "hybrid",
                       "--limit", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--key-switching applies to --scheme ckks" in err[0], err


def test_serve_compiles_its_ckks_models_for_hybrid_keys(data_dir):
    from medhe.data import load_dataset
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs, predict_logits
    from medhe.service.client import Client
    from medhe.service.launch import ServerProcess

    art = load_artifact("pneumoniamnist")
    scans = load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images[3:5]
    plain = predict_logits(art.model, model_inputs(art, scans)).argmax(1)
    with ServerProcess(["pneumoniamnist", "covid-cxr:paillier"], workers=1,
                       extra_args=["--key-switching", "hybrid"]) as srv, Client(srv.url) as client:
        spec = client.model_info("pneumoniamnist")["spec"]
        assert spec["key_envelope"]["version"] == 2 and spec["params"]["alpha"] >= 1
        assert client.model_info("covid-cxr")["spec"]["scheme"] == "paillier"  # other schemes unaffected
        results = client.diagnose_many(list(scans), model="pneumoniamnist", progress=False)
        assert [art.labels.index(r.label) for r in results] == plain.tolist()
        client.forget_keys()
