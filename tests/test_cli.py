"""The command line as a user meets it: real models, real data, one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from medhe.cli import main


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medhe", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "demo", "bench"):
        assert command in out


def test_evaluate_ckks_json_records_backend_and_security(tmp_path):
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", "pneumoniamnist", "--scheme", "ckks", "--limit", "2", "--json", str(out),
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["params"]["backend"] in ("seal", "native")
    assert report["params"]["security_bits"] >= 128
    assert report["params"]["poly_degree"] == 8192 and report["agreement"] == 1.0


def test_evaluate_plain_writes_shared_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", "pneumoniamnist", "--limit", "64", "--json", str(out),
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert {"dataset", "model", "scheme", "n", "plain"} <= set(report)
    assert report["scheme"] == "plain" and report["n"] == 64
    assert 0.5 < report["plain"]["acc"] <= 1 and 0.5 < report["plain"]["auc"] <= 1
    assert "ACC" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["evaluate", "--model", "no-such-model"], ["no-such-model", "shipped models"]),
    (["evaluate", "--model", "pneumoniamnist", "--dataset", "nosuchmnist"], ["nosuchmnist"]),
    (["evaluate", "--model", "pneumoniamnist", "--limit", "0"], ["--limit"]),
])
def test_user_errors_are_one_line(args, words):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]


def test_missing_dataset_file_names_the_fix(tmp_path):
    import os

    env = {**os.environ, "MEDHE_DATA": str(tmp_path), "MEDHE_OFFLINE": "1"}
    proc = run_cli("evaluate", "--model", "pneumoniamnist", env=env)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "pneumoniamnist.npz" in line and str(tmp_path) in line and "MEDHE_DATA" in line


def test_version_answers_without_importing_torch():
    """``medhe --version`` is what a packager or a health check runs first: it must not pay torch's 5 s import."""
    import subprocess
    import sys

    code = ("import sys; from medhe.cli import main; rc = main(['--version']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("medhe ")
