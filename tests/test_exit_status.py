"""`make test` and `.ci/run` must fail when a test fails. Once concrete-python's runtime is loaded (the TFHE tests),
the interpreter's shutdown used to end the process with status 0 whatever pytest returned; tests/conftest.py keeps
pytest's status. This runs a real pytest on the TFHE tests plus one failing test and checks the exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_failing_test_after_the_tfhe_tests_fails_the_run(tmp_path):
    failing = TESTS / f"test_zz_fails_on_purpose_{os.getpid()}.py"  # under tests/: the session uses conftest.py
    failing.write_text("def test_fails_on_purpose():\n    assert False\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                               str(TESTS / "test_tfhe.py"), str(failing)],
                              cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
    finally:
        failing.unlink()
    assert "1 failed" in proc.stdout, proc.stdout[-2000:]
    assert proc.returncode == 1, proc.stdout[-2000:]
