"""Shared test set-up: real data from MEDHE_DATA (default ../shared/data), never the network."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEDHE_DATA", str(REPO.parent / "shared" / "data"))
os.environ["MEDHE_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["MEDHE_DATA"])
    if not (path / "pneumoniamnist.npz").is_file():
        pytest.fail(f"real data not found in {path}: set MEDHE_DATA to the folder holding pneumoniamnist.npz")
    return path


# -- the exit status must survive interpreter shutdown ------------------------------------------------------------
# After the TFHE tests have loaded concrete-python's compiled runtime, the interpreter's shutdown ends the process
# with status 0 whatever pytest returned (measured: a failing test after `tests/test_tfhe.py` left `make test`, and
# so `.ci/run`, exiting 0). So once pytest has reported a failing session, the process ends right after the other
# plugins' unconfigure with that status (stdout and stderr flushed), skipping the shutdown that would overwrite it.
_SESSION_STATUS: dict[str, int] = {}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _SESSION_STATUS["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import sys

    status = _SESSION_STATUS.get("status", 0)
    if status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


# -- memory per test (MEDHE_TEST_RSS=path): which tests grow the pytest process ------------------------------------
def _rss_kb() -> tuple[int, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("MEDHE_TEST_RSS")
    if not path:
        yield
        return
    before = _rss_kb()
    yield
    after = _rss_kb()
    with open(path, "a") as f:
        f.write(f"{item.nodeid}\t{before[0] // 1024}\t{after[0] // 1024}\t{after[1] // 1024}\n")
