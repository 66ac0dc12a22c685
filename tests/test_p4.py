"""P4 replication: what an 8-bit re-save of Paillier ciphertexts keeps of the pixels, and the experiment command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from phe import paillier

from medhe.cli import main
from medhe.errors import DataError, SecurityError
from medhe.experiments.p4 import encrypt_images, mutual_information, run_p4_experiment


@pytest.fixture(scope="module")
def public_key():
    return paillier.generate_paillier_keypair(n_length=128)[0]


def test_fresh_randomness_leaves_noise_reused_randomness_leaves_a_substitution(public_key):
    rng = np.random.default_rng(0)
    # four grey levels; 16k pixels keep the plug-in estimator's spread (sd ~0.002 bits) far below the 0.05 margin
    # (with 2k pixels it was ~0.025 bits, and a fresh key per run made the comparison flaky)
    images = rng.integers(0, 4, (4, 64, 64)).astype(np.uint8) * 60
    fresh = encrypt_images(images, public_key, "fresh")
    mi = mutual_information(images, fresh)
    assert mi["bits"] < mi["shuffled_bits"] + 0.05  # no more dependence than shuffled pairs
    black = encrypt_images(np.zeros((1, 32, 32), np.uint8), public_key, "fresh")
    assert len(np.unique(black)) > 200  # one grey level becomes (nearly) every byte value
    glob = encrypt_images(images, public_key, "global")
    for v in np.unique(images):  # a fixed table: equal pixels give equal bytes, in every image
        assert len(np.unique(glob[images == v])) == 1
    per_image = encrypt_images(images, public_key, "image")
    for img, enc in zip(images, per_image):
        for v in np.unique(img):
            assert len(np.unique(enc[img == v])) == 1
    assert mutual_information(images, glob)["bits"] > 1.9  # all 2 bits of the four levels survive


def test_bad_arguments_are_refused(data_dir, public_key):
    with pytest.raises(SecurityError):
        run_p4_experiment(data_dir, key_bits=64, out_dir=None)
    with pytest.raises(DataError, match="mode"):
        run_p4_experiment(data_dir, modes=("reused",), out_dir=None)
    with pytest.raises(DataError, match="mode"):
        encrypt_images(np.zeros((1, 4, 4), np.uint8), public_key, "reused")


@pytest.mark.slow
def test_experiment_command_writes_reports(data_dir, tmp_path, capsys):
    out = tmp_path / "p4"
    rc = main(["experiment", "p4", "--data-dir", str(data_dir), "--limit", "8", "--size", "32", "--epochs", "1",
               "--key-bits", "128", "--modes", "fresh,global", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "p4_report.json").read_text())
    assert set(report["modes"]) == {"fresh", "global"}
    assert report["n_images"] == {"train": 8, "val": 8, "test": 8}
    assert 0.0 <= report["plain"]["test"]["acc"] <= 1.0
    fresh_mi = report["modes"]["fresh"]["mutual_information"]
    assert fresh_mi["bits"] < report["modes"]["global"]["mutual_information"]["bits"]
    assert "P4 replication" in (out / "p4_report.md").read_text()
    assert (out / "p4_examples_fresh.png").is_file()
    assert "fresh" in capsys.readouterr().out
