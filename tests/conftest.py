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
