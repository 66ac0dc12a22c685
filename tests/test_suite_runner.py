"""tests/suite.py, the runner ``make test`` uses: its packing, its summary and exit status, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import suite

RUNNER = Path(suite.__file__)


def test_long_files_run_alone_and_short_ones_are_packed():
    known = {"a.py": {"seconds": 300, "peak_mb": 7000}, "b.py": {"seconds": 30, "peak_mb": 900},
             "c.py": {"seconds": 20, "peak_mb": 2000}, "d.py": {"seconds": 5, "peak_mb": 100},
             "e.py": {"seconds": 10, "peak_mb": 5000}}
    jobs = suite.plan_jobs(["a.py", "b.py", "c.py", "d.py", "e.py", "new.py"], known)
    assert jobs[0].files == ["a.py"] and jobs[0].peak_mb == 7000  # longest first, alone
    alone = [j.files for j in jobs if len(j.files) == 1]
    # short but heavy (SEAL's pool would add its peak to its group's), and unmeasured (counted DEFAULT_PEAK_MB)
    assert ["e.py"] in alone and ["new.py"] in alone
    packed = [sorted(j.files) for j in jobs if j.files not in (["a.py"], ["e.py"], ["new.py"])]
    assert sorted(f for group in packed for f in group) == ["b.py", "c.py", "d.py"]
    assert all(j.seconds <= suite.GROUP_SECONDS for j in jobs[1:])
    assert max(j.peak_mb for j in jobs if "c.py" in j.files) >= 2000  # a group's peak is its largest file's


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "test_case.py"
    path.write_text(body)
    return path


def test_a_failing_file_fails_the_run_and_is_named(tmp_path):
    ok = _write(tmp_path, "def test_ok():\n    assert True\n")
    bad = tmp_path / "test_bad.py"
    bad.write_text("def test_bad():\n    assert 1 == 2\n")
    done = subprocess.run([sys.executable, str(RUNNER), str(ok), str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "test_bad.py::test_bad" in done.stdout
    assert "1 failed, 1 passed" in done.stdout.splitlines()[-1]


def test_ctrl_c_ends_with_the_summary_and_runs_the_finalizers(tmp_path):
    marker = tmp_path / "finalized"
    started = tmp_path / "started"
    case = _write(tmp_path, f'''
import pathlib, time
import pytest

@pytest.fixture()
def resource():
    yield
    pathlib.Path({str(marker)!r}).write_text("stopped")  # what a Ray cluster's fixture does: stop what it started

def test_long(resource):
    pathlib.Path({str(started)!r}).write_text("running")
    time.sleep(120)
''')
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(case)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the test never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "INTERRUPTED" in out and "Traceback" not in out
    assert marker.read_text() == "stopped"
