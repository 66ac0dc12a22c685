"""A fourth scheme is one package (issue 30): the toy "identity" scheme in tests/identity_scheme (plaintext framed as
bytes, for tests only) is registered at run time and then served by ``medhe serve``, diagnosed through the SDK,
load-tested by the service benchmark and reported by ``medhe evaluate`` -- with no change to medhe itself. Real
server on 127.0.0.1 in its own process, real PneumoniaMNIST scans, the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medhe.errors import PlanError
from medhe.he.scheme import (SCHEMES, client_for, compile_batch, compile_model, has_hook, register_scheme, schemes,
                             unregister_scheme)

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def identity(monkeypatch):
    """The toy scheme registered here and, through the environment, in every process started meanwhile (which
    import it from tests/, hence PYTHONPATH)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    register_scheme("identity", "identity_scheme")
    yield "identity"
    unregister_scheme("identity")


@pytest.fixture(scope="module")
def scans(data_dir):
    """Real test scans and the plaintext model's class for each."""
    from medhe.data import load_dataset
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs, predict_logits

    art = load_artifact("pneumoniamnist")
    images = load_dataset("pneumoniamnist", split="test", size=28, data_dir=data_dir).images[:6]
    return art, images, predict_logits(art.model, model_inputs(art, images))


def test_registering_a_package_adds_a_scheme_with_the_contract_and_clear_errors_for_missing_modes(identity, scans):
    art, images, plain = scans
    assert identity in schemes() and identity not in SCHEMES  # the shipped list is unchanged
    server = compile_model(art, identity)
    client = client_for(json.loads(json.dumps(server.spec())))
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    from medhe.models.predict import model_inputs

    logits = np.stack([client.decrypt(server.infer(keys, client.encrypt(x))) for x in model_inputs(art, images)])
    assert np.max(np.abs(logits - plain)) < 1e-5
    assert not has_hook(identity, "compile_batch") and has_hook(identity, "upload_rules")
    with pytest.raises(PlanError, match="scheme 'identity' has no batch mode"):
        compile_batch(art, identity)
    unregister_scheme(identity)
    with pytest.raises(PlanError, match="unknown scheme 'identity'"):
        compile_model(art, identity)
    register_scheme("ghost", "no_such_scheme_package")  # a package no process can import: one line, no traceback
    try:
        with pytest.raises(PlanError, match="scheme 'ghost': its package 'no_such_scheme_package' cannot be imported"):
            compile_model(art, "ghost")
    finally:
        unregister_scheme("ghost")
    with pytest.raises(PlanError, match="cannot register scheme 'ckks'"):
        register_scheme("ckks", "identity_scheme")  # a shipped scheme is never replaced


@pytest.mark.slow
def test_the_identity_scheme_is_served_diagnosed_and_load_tested(identity, scans, data_dir):
    """``medhe serve --model pneumoniamnist:identity`` with a worker process: the listing carries the scheme's own
    upload rules, the SDK's diagnoses are the plaintext model's, a malformed input gets the scheme's one-line 422,
    and the service load test (what ``medhe bench --service --url`` runs) completes with no failure and no
    mismatch."""
    from medhe.service import protocol
    from medhe.service.client import Client
    from medhe.service.errors import ServiceError
    from medhe.service.launch import ServerProcess
    from medhe.service.loadtest import run_service_benchmark

    art, images, plain = scans
    with ServerProcess(["pneumoniamnist:identity"], workers=1) as srv, Client(srv.url) as client:
        info = client.model_info()
        assert info["scheme"] == identity and info["spec"]["params"]["backend"] == "plaintext"
        assert info["limits"]["key_bytes"] == 21 and info["limits"]["input_bytes"] == 5 + 4 * 28 * 28
        assert "batch" not in info["endpoints"]  # no batch hook: no batch routes announced
        results = client.diagnose_many(list(images), progress=False)
        assert [art.labels.index(r.label) for r in results] == plain.argmax(1).tolist()
        sess = client.session()
        with pytest.raises(ServiceError, match="holds 2 values; this model takes 784") as bad:
            client.infer_response(sess, b"MHID\x02" + bytes(8))
        assert bad.value.status == 422
        result = run_service_benchmark(url=srv.url, model="pneumoniamnist:identity", clients=4, requests=24,
                                       data_dir=str(data_dir), n_images=8)
        client.forget_keys()
    assert result["server"] == "external" and result["completed"] == 24
    assert result["failures"] == 0 and result["mismatches"] == 0 and not result["errors"]
    assert result["setup"]["key_bytes"] == 21 and result["setup"]["ciphertext_bytes"] == 5 + 4 * 28 * 28
    assert protocol.infer_path(info["id"]) == info["endpoints"]["infer"]


@pytest.mark.slow
def test_medhe_evaluate_reports_the_identity_scheme(identity, tmp_path, data_dir):
    """The real CLI in a process of its own (the scheme reaches it through the environment): the shared report
    schema, exact agreement, and the Markdown report."""
    from medhe.he.report import check_report

    out = tmp_path / "identity.json"
    run = subprocess.run([sys.executable, "-m", "medhe", "evaluate", "--model", "pneumoniamnist", "--scheme",
                          identity, "--sample", "24", "--data-dir", str(data_dir), "--no-progress", "--json",
                          str(out), "--report", str(tmp_path / "report")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert check_report(report) == []
    assert report["scheme"] == identity and report["n"] == report["n_encrypted"] == 24
    assert report["agreement"] == 1.0 and report["max_abs_logit_error"] < 1e-5
    assert report["params"]["backend"] == "plaintext"
    assert "identity" in (tmp_path / "report" / "report.md").read_text()
