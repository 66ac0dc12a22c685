"""The rough edges a new user hit (issue 20), each checked through the real command line or the real function."""

import json
import os
import subprocess
import sys

import pytest

from medhe.cli import main
from medhe.errors import DataError

COVID = os.path.join(os.environ["MEDHE_DATA"], "covid19_radiography_subset", "COVID", "COVID-1.png")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medhe", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_predict_accepts_the_url_serve_prints():
    from medhe.service import protocol
    from medhe.service.launch import ServerProcess

    with ServerProcess(["covid-cxr:paillier"], workers=0) as srv:
        proc = run_cli("predict", "--server", srv.url + protocol.PREFIX + "/", COVID, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["results"][0]
    assert result["label"] in ("COVID", "Normal") and result["positive"] == []


@pytest.mark.slow
def test_predict_refuses_an_image_unlike_the_training_data_by_default(tmp_path):
    """Refusal is the default since issue 32 (it took --strict before); --allow-unusual diagnoses, marked."""
    import numpy as np
    from PIL import Image

    from medhe.service.launch import ServerProcess

    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((1, 1), 128, dtype=np.uint8)).save(tiny)
    with ServerProcess(["covid-cxr:paillier"], workers=0) as srv:
        refused = run_cli("predict", "--server", srv.url, str(tiny))
        warned = run_cli("predict", "--server", srv.url, "--allow-unusual", str(tiny))
        accepted = run_cli("predict", "--server", srv.url, "--strict", COVID)  # --strict: still accepted
    line = one_line_error(refused)
    assert str(tiny) in line and "nothing was sent" in line and "--allow-unusual" in line
    assert warned.returncode == 0 and "  check: " in warned.stdout and "unreliable" in warned.stdout, warned.stderr
    assert accepted.returncode == 0 and "check:" not in accepted.stdout, accepted.stderr


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["paillier", "tfhe"])
def test_demo_runs_every_scheme_on_its_default_model(scheme):
    proc = run_cli("demo", "--scheme", scheme, "-n", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"Encrypted diagnosis ({scheme.upper()})" in proc.stdout and "agreement 1.000" in proc.stdout


ERROR_CASES = [
    (["demo", "-n", "0"], ["-n/--images"]),
    (["evaluate", "--scheme", "ckks", "--fhe", "execute", "--limit", "1"], ["--fhe", "tfhe only"]),
    (["evaluate", "--limit", "1", "--json", "/no/such/folder/r.json"], ["/no/such/folder", "does not exist"]),
    (["evaluate", "--limit", "1", "--data-dir", "/no/such/folder/data"], ["/no/such/folder", "exists"]),
    (["evaluate", "--limit", "1", "--report", "/no/such/folder/rep"], ["/no/such/folder", "does not exist"]),
    (["bench", "--scheme", "paillier", "--json", "/no/such/folder/b.json"], ["/no/such/folder", "does not exist"]),
    (["serve", "--host", "192.0.2.1", "--port", "8123", "--model", "covid-cxr:paillier"], ["--host 192.0.2.1", "not an address"]),
    (["evaluate", "--model", "pneumoniamnist-qfcnn", "--scheme", "ckks", "--limit", "1"], ["--scheme tfhe"]),
]


@pytest.fixture(scope="module")
def error_runs() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every ERROR_CASES command line, run once in one fresh interpreter (tests/cli_cases.py)."""
    from cli_cases import run_cases

    return {tuple(args): proc for (args, _), proc in zip(ERROR_CASES, run_cases([a for a, _ in ERROR_CASES]))}


@pytest.mark.parametrize("args, words", ERROR_CASES)
def test_errors_name_the_option_not_python_internals(args, words, error_runs):
    line = one_line_error(error_runs[tuple(args)])
    for word in words:
        assert word in line, line
    for internal in ("QFCNN", "nn.Sequential", "compile_", "evaluate_tfhe", "feature_bound="):
        assert internal not in line, line
    assert not os.path.exists("/no/such/folder")


def test_a_folder_is_not_an_image(tmp_path):
    from medhe.data import read_image

    with pytest.raises(DataError, match="is a folder"):
        read_image(tmp_path)


@pytest.mark.slow
def test_bench_json_goes_to_the_file_only(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--scheme", "paillier", "-n", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) < 25 and "{" not in printed and str(out) in printed
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] >= 1 and set(result["server_eval_ms_warm_pool"]) >= {"median", "p95"}


def test_numbers_print_cleanly():
    from medhe.textformat import ms
    from medhe.cli.train import label_list

    assert [ms(v) for v in (0.7123, 31.456, 1234.5678, None)] == ["0.71", "31.5", "1235", "-"]
    assert label_list(["malignant", "normal, benign"]) == '2 labels: "malignant", "normal, benign"'


def test_evaluate_prints_latencies_without_noise(tmp_path, capsys):
    assert main(["evaluate", "--model", "covid-cxr", "--scheme", "paillier", "--key-bits", "3072", "--limit", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith(("encrypt ", "eval ", "decrypt "))]
    assert len(rows) == 3
    for row in rows:
        for cell in row.split()[1:]:
            assert len(cell.split(".")[-1]) <= 2 if "." in cell else True, row
