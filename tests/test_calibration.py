"""Calibration on the client: temperature scaling and split-conformal prediction sets (medhe.models.calibration,
``medhe calibrate``, the ``calibration`` block of ``medhe evaluate``, ``medhe predict --coverage/--abstain``).

Real parts only: the shipped pneumoniamnist model on its real splits, real CKKS encryption, a real ``medhe serve``
on 127.0.0.1. Every write goes to a copy of the model in a temporary folder.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medhe.cli import main as medhe_main
from medhe.data import load_dataset
from medhe.errors import ArtifactError, DataError
from medhe.models import calibration as cal
from medhe.models.artifact import load_artifact, resolve_model_dir
from medhe.models.predict import model_inputs, predict_logits

MODEL = "pneumoniamnist"


@pytest.fixture(scope="module")
def splits(data_dir):
    """Plain logits and labels of the shipped model on its real val and test splits."""
    artifact = load_artifact(MODEL)
    out = {}
    for split in ("val", "test"):
        ds = load_dataset(MODEL, split=split, size=28, data_dir=data_dir)
        out[split] = (ds.labels.reshape(-1), predict_logits(artifact.model, model_inputs(artifact, ds.images)),
                      ds.images)
    return out


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory, data_dir):
    """A copy of the shipped model calibrated by ``medhe calibrate`` (the folder is named like the model, so the
    server's id stays ``pneumoniamnist``)."""
    root = tmp_path_factory.mktemp("calibrated")
    target = root / MODEL
    shutil.copytree(resolve_model_dir(MODEL), target)
    assert medhe_main(["calibrate", str(target), "--data-dir", str(data_dir)]) == 0
    return target


# -- the method ---------------------------------------------------------------------------------------------------
def test_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 11) / 10.0  # n = 10
    assert cal.quantile(scores, 0.9) == 1.0  # ceil(11 * 0.9) = 10 -> the largest
    assert cal.quantile(scores, 0.8) == 0.9  # ceil(11 * 0.8) = 9
    assert cal.quantile(scores[:5], 0.9) == 1.0  # rank 6 > n = 5: every label
    for bad in (0, 1, 1.5, -0.1, "x"):
        with pytest.raises(DataError):
            cal.quantile(scores, bad)


def test_fit_record_and_ece_on_real_splits(splits):
    yv, zv, _ = splits["val"]
    yt, zt, _ = splits["test"]
    rec = cal.fit_calibration("binary-class", yv, zv)
    json.dumps(rec)  # JSON-able
    assert rec["fitted_on"] == "val" and rec["n"] == len(yv) and rec["temperature"] > 0
    assert rec["nll_val_after"] <= rec["nll_val_before"]
    scores = rec["conformal"]["val_scores"]
    assert len(scores) == len(yv) and scores == sorted(scores)
    # temperature changes confidence, never the decision
    probs = cal.calibrated_probabilities(rec, "binary-class", zt)
    assert np.array_equal(probs.argmax(axis=1), zt.argmax(axis=1))
    # a real model made over-confident (logits x 3) and under-confident (x 1/3): the temperature found on val
    # undoes it, and test ECE falls
    for factor in (3.0, 1 / 3):
        r = cal.fit_calibration("binary-class", yv, zv * factor)
        assert r["temperature"] == pytest.approx(rec["temperature"] * factor, rel=0.05)
        before = cal.ece("binary-class", yt, cal._softmax(zt * factor))
        after = cal.ece("binary-class", yt, cal.calibrated_probabilities(r, "binary-class", zt * factor))
        assert after < before - 0.02, (factor, before, after)
    with pytest.raises(DataError, match="validation"):
        cal.fit_calibration("binary-class", yt, zt, fitted_on="test")


def test_coverage_where_calibration_and_test_images_are_exchangeable(splits):
    """The guarantee holds for images exchangeable with the calibration images: random halves of the pooled real
    val + test images, 200 times, give a mean coverage within 2 points of 0.90 (theory: 0.900 to 0.902)."""
    y = np.concatenate([splits["val"][0], splits["test"][0]])
    z = np.concatenate([splits["val"][1], splits["test"][1]])
    rng = np.random.default_rng(0)
    for c in (0.9, 0.8, 0.95):  # any coverage from the same stored scores
        covs = []
        for _ in range(200 if c == 0.9 else 60):
            perm = rng.permutation(len(y))
            fit, held = perm[: len(y) // 2], perm[len(y) // 2:]
            rec = cal.fit_calibration("binary-class", y[fit], z[fit])
            covs.append(cal.set_summary("binary-class", y[held], cal.prediction_sets(rec, "binary-class", z[held],
                                                                                    c))["coverage"])
        assert abs(np.mean(covs) - c) < 0.02, (c, np.mean(covs))


def test_val_to_test_coverage_and_why_it_falls_short(splits):
    """Fitted on val, measured on test. PneumoniaMNIST's test split is not exchangeable with its val split (val is
    cut from the training pool; test is the original test set): for the shipped model the 'normal' test images
    are much harder (accuracy 0.98 on val, 0.83 on test), so their sets cover ~0.63 and the whole split ~0.80.
    So the assertion is: coverage within 2 points of 0.90, or a shortfall confined to classes whose accuracy fell,
    with the classes whose accuracy held covered as promised."""
    yv, zv, _ = splits["val"]
    yt, zt, _ = splits["test"]
    rec = cal.fit_calibration("binary-class", yv, zv)
    sets = cal.prediction_sets(rec, "binary-class", zt, 0.9)
    coverage = cal.set_summary("binary-class", yt, sets)["coverage"]
    if abs(coverage - 0.90) <= 0.02:
        return
    acc = {s: [np.mean(z.argmax(1)[y == k] == k) for k in (0, 1)] for s, (y, z, _) in splits.items()}
    drop = np.array(acc["val"]) - np.array(acc["test"])
    assert drop.max() > 0.05, f"coverage {coverage:.3f} off without a class that got harder: {acc}"
    for k in np.flatnonzero(drop < 0.02):
        cov_k = np.mean([k in sets[i] for i in np.flatnonzero(yt == k)])
        assert cov_k >= 0.87, (k, cov_k, acc)


def test_sets_and_words_for_every_size():
    rec = cal.fit_calibration("binary-class", [0, 1, 0, 1, 1, 0, 1, 0, 1],
                              [[2, -1], [-1, 2], [1, 0], [0, 3], [-2, 1], [0.5, 0], [0, 0.2], [3, 0], [0.1, 0]])
    labels = ["normal", "pneumonia"]
    assert cal.describe_set("binary-class", labels, [1]) == "pneumonia"
    assert cal.describe_set("binary-class", labels, [0, 1]) == "uncertain: both"
    assert cal.describe_set("binary-class", labels, []) == "uncertain: neither label reaches the set's threshold"
    sets = cal.prediction_sets(rec, "binary-class", [[0.0, 0.0], [9.0, -9.0]], 0.5)
    assert all(s == sorted(s) for s in sets) and sets[1] == [0]
    # multi-label: one T and one score list per label; per-label sets of {0: negative, 1: positive}
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(300, 3))
    z = (2 * y - 1) * rng.gamma(2.0, 1.5, size=(300, 3)) * rng.choice([1, 1, 1, -1], size=(300, 3))
    mrec = cal.fit_calibration("multi-label", y, z)
    assert len(mrec["temperature"]) == 3 and len(mrec["conformal"]["val_scores"]) == 3
    msets = cal.prediction_sets(mrec, "multi-label", z, 0.9)
    assert all(set(map(len, row)) <= {0, 1, 2} for row in msets)
    summary = cal.set_summary("multi-label", y, msets)
    assert summary["coverage"] >= 0.9
    text = cal.describe_set("multi-label", ["a", "b", "c"], [[1], [0, 1], [0]])
    assert text == "a; uncertain: b"


def test_malformed_records_are_one_clear_error(splits):
    yv, zv, _ = splits["val"]
    good = cal.fit_calibration("binary-class", yv, zv)
    bad_cases = [None, {**good, "method": "platt"}, {**good, "temperature": -1},
                 {**good, "conformal": {"val_scores": [0.5, 0.1]}}, {**good, "conformal": {"val_scores": []}},
                 {**good, "num_outputs": 3}]
    for bad in bad_cases:
        with pytest.raises(ArtifactError, match="calibration record .* malformed") as err:
            cal.prediction_sets(bad, "binary-class", zv[:3])
        assert "\n" not in str(err.value)


# -- medhe calibrate and medhe evaluate ---------------------------------------------------------------------------
def test_calibrate_writes_the_card_and_refuses_test(calibrated_dir, tmp_path, data_dir, capsys):
    card = json.loads((calibrated_dir / "card.json").read_text())
    original = json.loads((resolve_model_dir(MODEL) / "card.json").read_text())
    assert {k: v for k, v in card.items() if k != "calibration"} == original  # nothing else changed
    rec = card["calibration"]
    assert rec["fitted_on"] == "val" and rec["conformal"]["default_coverage"] == 0.9
    cal.check_record(rec, "binary-class", 2)
    before = (calibrated_dir / "card.json").read_bytes()
    capsys.readouterr()
    assert medhe_main(["calibrate", str(calibrated_dir), "--split", "test", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "validation split only" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert medhe_main(["calibrate", str(calibrated_dir), "--coverage", "1.5"]) == 2
    assert (calibrated_dir / "card.json").read_bytes() == before  # refused runs leave the card alone
    assert not list(calibrated_dir.glob(".card.json.*"))  # no temporary file left behind


def test_evaluate_reports_calibration_and_a_bad_record_fails_first(calibrated_dir, tmp_path, data_dir, capsys):
    out = tmp_path / "plain.json"
    assert medhe_main(["evaluate", "--model", str(calibrated_dir), "--split", "test", "--data-dir", str(data_dir),
                       "--json", str(out), "--coverage", "0.95"]) == 0
    report = json.loads(out.read_text())
    block = report["calibration"]
    from medhe.he.report import check_calibration

    assert check_calibration(report) == []
    assert block["coverage_target"] == 0.95 and block["fitted_on"] == "val" and block["encrypted"] is None
    assert set(block["plain"]) >= {"ece_before", "ece_after", "coverage", "mean_set_size", "singletons", "empty"}
    assert block["plain"]["n"] == report["n"] == 624
    # the shipped card (no record) gives the report it always gave
    plain = tmp_path / "uncalibrated.json"
    assert medhe_main(["evaluate", "--model", MODEL, "--split", "test", "--data-dir", str(data_dir),
                       "--json", str(plain)]) == 0
    assert "calibration" not in json.loads(plain.read_text())
    # a malformed record: one line, before anything runs
    broken = tmp_path / MODEL
    shutil.copytree(calibrated_dir, broken)
    card = json.loads((broken / "card.json").read_text())
    card["calibration"]["conformal"]["val_scores"] = "oops"
    (broken / "card.json").write_text(json.dumps(card))
    capsys.readouterr()
    assert medhe_main(["evaluate", "--model", str(broken), "--scheme", "ckks", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "calibration record" in err and "malformed" in err and "Traceback" not in err


@pytest.mark.slow
def test_plain_and_ckks_give_identical_sets(calibrated_dir, tmp_path, data_dir):
    """Real CKKS (keys, encryption, the server's evaluation, decryption) on 48 test images: the client's sets from
    the decrypted logits are the plain model's sets."""
    out = tmp_path / "ckks.json"
    assert medhe_main(["evaluate", "--model", str(calibrated_dir), "--scheme", "ckks", "--split", "test",
                       "--limit", "48", "--data-dir", str(data_dir), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    from medhe.he.report import check_report

    assert check_report(report) == []  # the shared schema, calibration block included
    block = report["calibration"]
    assert block["sets_identical_plain_encrypted"] is True
    assert block["encrypted"]["n"] == 48 and block["encrypted"]["coverage"] == block["plain"]["coverage"]
    assert block["encrypted"]["ece_after"] == pytest.approx(block["plain"]["ece_after"], abs=1e-3)
    # the same from the exact decrypted logits, through the scheme interface directly
    from medhe.he.evaluate import run_encrypted
    from medhe.he.scheme import compile_model

    artifact = load_artifact(calibrated_dir)
    images = load_dataset(MODEL, split="test", size=28, data_dir=data_dir).images[:16]
    x = model_inputs(artifact, images)
    enc = run_encrypted(compile_model(artifact, "ckks"), x, progress=False)["logits"]
    rec = artifact.card["calibration"]
    for c in (0.8, 0.9, 0.99):
        assert cal.prediction_sets(rec, artifact.task, enc, c) == cal.prediction_sets(
            rec, artifact.task, predict_logits(artifact.model, x), c)


# -- medhe predict through a real server --------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_coverage_and_abstain_through_a_real_server(calibrated_dir, splits, tmp_path, capsys):
    from medhe.service.client import Client
    from medhe.service.launch import ServerProcess

    yt, zt, images = splits["test"]
    rec = json.loads((calibrated_dir / "card.json").read_text())["calibration"]
    sets = cal.prediction_sets(rec, "binary-class", zt, 0.9)
    picked = [i for i, s in enumerate(sets) if len(s) == 1][:3] + [i for i, s in enumerate(sets) if len(s) != 1][:3]
    assert len(picked) == 6
    paths = []
    for i in picked:
        paths.append(str(tmp_path / f"scan{i}.png"))
        Image.fromarray(images[i]).save(paths[-1])
    labels = ["normal", "pneumonia"]
    with ServerProcess([str(calibrated_dir)], workers=1) as srv:
        capsys.readouterr()
        assert medhe_main(["predict", "--server", srv.url, "--json", "--abstain", *paths]) == 0
        results = json.loads(capsys.readouterr().out)["results"]
        for i, r in zip(picked, results):
            assert r["prediction_set"] == [labels[k] for k in sets[i]]
            assert r["coverage"] == 0.9 and r["abstained"] is (len(sets[i]) != 1)
            assert (r["label"] is None) is r["abstained"]
            if not r["abstained"]:
                assert r["label"] == labels[int(zt[i].argmax())]
        assert medhe_main(["predict", "--server", srv.url, "--abstain", *paths]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert sum("no diagnosis (abstained" in line for line in lines) == 3
        assert all("set:" in line for line in lines if "abstained" not in line)
        # another coverage from the same record, through the SDK
        with Client(srv.url) as client:
            many = client.diagnose_many(paths, progress=False, coverage=0.99)
        assert [d.prediction_set for d in many] == [
            [labels[k] for k in s] for s in cal.prediction_sets(rec, "binary-class", zt[picked], 0.99)]
        # the clinician page's backend: the listing says the model is calibrated, a job carries its coverage
        import time

        from medhe.ui.pipeline import Diagnoser

        diagnoser = Diagnoser(srv.url)
        try:
            (summary,) = diagnoser.models()
            assert summary["calibration"]["default_coverage"] == 0.9
            i = picked[-1]
            job = diagnoser.submit("scan", "scan.png", images[i], MODEL, coverage=0.95)
            deadline = time.monotonic() + 120
            while job.state in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert job.state == "done", job.error
            expected = cal.prediction_sets(rec, "binary-class", zt[i:i + 1], 0.95)[0]
            assert job.result["prediction_set"] == [labels[k] for k in expected]
            assert job.result["prediction_set_text"] == cal.describe_set("binary-class", labels, expected)
            assert job.result["coverage"] == 0.95 and set(job.result["calibrated_probabilities"]) == set(labels)
        finally:
            diagnoser.close()
    # a model without a record: --abstain is refused before anything is sent, plain predict is unchanged
    with ServerProcess([MODEL], workers=1) as srv:
        capsys.readouterr()
        assert medhe_main(["predict", "--server", srv.url, "--abstain", paths[0]]) == 2
        assert "no calibration record" in capsys.readouterr().err
        assert medhe_main(["predict", "--server", srv.url, "--json", paths[0]]) == 0
        r = json.loads(capsys.readouterr().out)["results"][0]
        assert "prediction_set" not in r and "calibrated_probabilities" not in r
