"""The clinician's metrics: hand-checked confusion matrices, P1's multi-label set against scikit-learn, bootstrap
intervals against a plain resampling loop, and the block in real `medhe evaluate` JSON and `medhe report`."""

import json

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medhe.errors import DataError
from medhe.models.clinical import clinical_metrics, positive_class
from medhe.stats import bootstrap_counts, percentile_interval

RNG = np.random.default_rng(11)


def _logits_for(decisions):
    """Two-class logits whose argmax is ``decisions`` (and whose P(class 1) orders the images as listed)."""
    d = np.asarray(decisions, dtype=float)
    margin = np.linspace(0.2, 1.0, len(d))
    return np.stack([np.zeros(len(d)), np.where(d == 1, margin, -margin)], axis=1)


def test_binary_confusion_matrix_by_hand():
    # truth:    1 1 1 0 0 0 0 1   (normal=0, pneumonia=1)
    # decision: 1 1 0 0 0 1 0 1   -> TP 3, FN 1, FP 1, TN 3
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1]).reshape(-1, 1)
    z = _logits_for([1, 1, 0, 0, 0, 1, 0, 1])
    m = clinical_metrics("binary-class", y, z, ["normal", "pneumonia"], resamples=200)
    assert m["positive"] == {"index": 1, "label": "pneumonia", "rule": "normal-label"}
    assert m["confusion"] == {"positive": "pneumonia", "negative": "normal", "tp": 3, "fn": 1, "fp": 1, "tn": 3}
    assert m["sensitivity"]["value"] == 0.75 and m["specificity"]["value"] == 0.75
    assert m["ppv"]["value"] == 0.75 and m["npv"]["value"] == 0.75 and m["acc"]["value"] == 0.75
    assert m["operating_point"] == {"fpr": 0.25, "tpr": 0.75}
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y[:, 0], softmax(z, axis=1)[:, 1]), abs=1e-6)
    assert m["threshold"]["probability"] == 0.5 and "P(pneumonia) > 0.5" in m["threshold"]["rule"]


def test_positive_class_zero_swaps_the_cells():
    # covid-cxr's labels: ["COVID", "Normal"], COVID (index 0) is the finding
    y = np.array([0, 0, 0, 1, 1]).reshape(-1, 1)  # three COVID, two normal
    z = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # decided COVID, COVID, N, N, COVID
    m = clinical_metrics("binary-class", y, z, ["COVID", "Normal"], resamples=50)
    assert m["positive"]["label"] == "COVID" and m["negative"]["label"] == "Normal"
    assert m["confusion"] == {"positive": "COVID", "negative": "Normal", "tp": 2, "fn": 1, "fp": 1, "tn": 1}
    assert m["sensitivity"]["value"] == pytest.approx(2 / 3, abs=1e-6) and m["specificity"]["value"] == 0.5
    assert m["ppv"]["value"] == pytest.approx(2 / 3, abs=1e-6) and m["npv"]["value"] == 0.5
    # AUC of P(COVID) against "is COVID" equals the usual AUC on P(class 1)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y[:, 0], softmax(z, axis=1)[:, 1]), abs=1e-6)
    assert "P(COVID) >= 0.5" in m["threshold"]["rule"]


def test_positive_class_rules_on_the_shipped_label_names():
    assert positive_class(["normal", "pneumonia"]) == (1, "normal-label")
    assert positive_class(["COVID", "Normal"]) == (0, "normal-label")
    assert positive_class(["malignant", "normal, benign"]) == (0, "normal-label")  # breastmnist
    assert positive_class(["PNEUMONIA", "NORMAL"]) == (0, "normal-label")
    assert positive_class(["normal", "abnormal"]) == (1, "normal-label")  # "abnormal" is not a normal label
    assert positive_class(["benign", "malignant"]) == (1, "index-1")
    assert positive_class(["COVID", "Normal"], positive_label="normal") == (1, "card")
    with pytest.raises(DataError, match="positive_label 'tumour' is not one of its labels"):
        positive_class(["normal", "pneumonia"], positive_label="tumour")


def test_multilabel_set_matches_scikit_learn():
    y = RNG.integers(0, 2, size=(150, 5))
    z = RNG.normal(size=(150, 5)) + 1.2 * y - 0.3
    m = clinical_metrics("multi-label", y, z, list("ABCDE"), resamples=100)
    p, pred = expit(z), (z > 0).astype(int)
    assert m["subset_accuracy"]["value"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    for avg in ("micro", "macro", "weighted"):
        assert m["auc"][avg]["value"] == pytest.approx(roc_auc_score(y, p, average=avg), abs=1e-6)
        assert m["f1"][avg]["value"] == pytest.approx(f1_score(y, pred, average=avg, zero_division=0), abs=1e-6)
    per_auc = roc_auc_score(y, p, average=None)
    per_f1 = f1_score(y, pred, average=None, zero_division=0)
    assert [r["label"] for r in m["per_label"]] == list("ABCDE")
    for k, row in enumerate(m["per_label"]):
        assert row["positives"] == int(y[:, k].sum())
        assert row["auc"]["value"] == pytest.approx(per_auc[k], abs=1e-6)
        assert row["f1"]["value"] == pytest.approx(per_f1[k], abs=1e-6)


def test_multilabel_label_with_one_class_is_null_and_skipped():
    y = RNG.integers(0, 2, size=(80, 4))
    y[:, 3] = 0  # never positive: no AUC on the split
    z = RNG.normal(size=(80, 4)) + y
    z[:, 3] = -5.0  # and never predicted: F1 undefined too
    m = clinical_metrics("multi-label", y, z, ["a", "b", "c", "d"], resamples=100)
    last = m["per_label"][3]
    assert last["auc"] == {"value": None, "ci95": None, "resamples": 0}
    assert last["f1"] == {"value": None, "ci95": None, "resamples": 0}
    p = expit(z)
    assert m["auc"]["macro"]["value"] == pytest.approx(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in range(3)]),
                                                       abs=1e-6)
    # macro F1 keeps scikit-learn's zero_division=0 for the undefined label, as compute_metrics' f1 does
    assert m["f1"]["macro"]["value"] == pytest.approx(f1_score(y, (z > 0).astype(int), average="macro",
                                                               zero_division=0), abs=1e-6)


def test_undefined_on_the_whole_split_is_null():
    y = np.zeros((6, 1), dtype=int)  # no pneumonia at all
    m = clinical_metrics("binary-class", y, RNG.normal(size=(6, 2)), ["normal", "pneumonia"], resamples=50)
    assert m["auc"]["value"] is None and m["auc"]["ci95"] is None
    assert m["sensitivity"]["value"] is None and m["operating_point"]["tpr"] is None
    assert m["specificity"]["value"] is not None
    assert clinical_metrics("multi-class", np.zeros((4, 1)), RNG.normal(size=(4, 3)), ["a", "b", "c"]) is None
    with pytest.raises(DataError, match="3 labels but 4 predictions"):
        clinical_metrics("binary-class", np.zeros((3, 1)), np.zeros((4, 2)))


def test_bootstrap_interval_is_the_plain_resampling_loop_deterministic_and_holds_the_estimate():
    """The weighted one-pass metrics give exactly what resampling the images and calling scikit-learn gives."""
    n, resamples = 60, 40
    y = RNG.integers(0, 2, size=(n, 1))
    z = RNG.normal(size=(n, 2)) + np.c_[np.zeros(n), y[:, 0]]
    m = clinical_metrics("binary-class", y, z, ["normal", "pneumonia"], resamples=resamples, seed=3)
    rng = np.random.default_rng(3)
    prob, pred = softmax(z, axis=1)[:, 1], z.argmax(1)
    aucs, accs, sens = [], [], []
    for _ in range(resamples):  # bootstrap_counts draws resample b as rng.integers(0, n, n)
        idx = rng.integers(0, n, n)
        accs.append(accuracy_score(y[idx, 0], pred[idx]))
        if 0 < y[idx, 0].sum() < n:
            aucs.append(roc_auc_score(y[idx, 0], prob[idx]))
        if y[idx, 0].sum():
            sens.append(np.mean(pred[idx][y[idx, 0] == 1]))
    for key, ref in (("auc", aucs), ("acc", accs), ("sensitivity", sens)):
        assert m[key]["ci95"] == pytest.approx(np.percentile(ref, [2.5, 97.5]), abs=1e-6)
        assert m[key]["resamples"] == len(ref)
        lo, hi = m[key]["ci95"]
        assert lo <= m[key]["value"] <= hi
    again = clinical_metrics("binary-class", y, z, ["normal", "pneumonia"], resamples=resamples, seed=3)
    other = clinical_metrics("binary-class", y, z, ["normal", "pneumonia"], resamples=resamples, seed=4)
    assert again == m and other["auc"]["ci95"] != m["auc"]["ci95"]
    assert m["bootstrap"] == {"resamples": resamples, "seed": 3, "interval": "percentile", "level": 0.95,
                              "unit": "image"}


def test_bootstrap_counts_do_not_depend_on_the_chunk_size():
    a = np.concatenate(list(bootstrap_counts(30, 10, seed=5, chunk=3)))
    b = np.concatenate(list(bootstrap_counts(30, 10, seed=5, chunk=64)))
    assert a.shape == (10, 30) and np.array_equal(a, b) and (a.sum(axis=1) == 30).all()
    assert percentile_interval([np.nan, np.nan]) is None
    assert percentile_interval([1.0, np.nan, 3.0]) == [1.05, 2.95]


# -- real models, real data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_runs(data_dir):
    from medhe.cli.evaluate import dumps, evaluate

    return {m: json.loads(dumps(evaluate(m, "plain", data_dir=str(data_dir), progress=False)))
            for m in ("pneumoniamnist", "breastmnist")}


def test_evaluate_plain_json_has_the_clinical_block(plain_runs):
    for name, positive in (("pneumoniamnist", "pneumonia"), ("breastmnist", "malignant")):
        r = plain_runs[name]
        c = r["clinical"]["plain"]
        assert c["kind"] == "binary" and c["positive"]["label"] == positive and c["n"] == r["n"]
        cm = c["confusion"]
        assert cm["tp"] + cm["fn"] + cm["fp"] + cm["tn"] == r["n"]
        y = np.asarray(r["logits"]["labels"])[:, 0]
        assert cm["tp"] + cm["fn"] == int(np.sum(y == c["positive"]["index"]))
        # the existing metrics are unchanged and the clinical block agrees with them
        assert c["acc"]["value"] == pytest.approx(r["plain"]["acc"], abs=1e-6)
        assert c["auc"]["value"] == pytest.approx(r["plain"]["auc"], abs=1e-5)
        for key in ("acc", "auc", "sensitivity", "specificity", "ppv", "npv"):
            lo, hi = c[key]["ci95"]
            assert lo <= c[key]["value"] <= hi
    # breastmnist: malignant is class 0, so its recall is not compute_metrics' F1 class
    b = plain_runs["breastmnist"]["clinical"]["plain"]
    assert b["positive"]["index"] == 0 and b["negative"]["label"] == "normal, benign"


def test_report_renders_the_clinicians_view_and_old_json_too(plain_runs, tmp_path):
    from medhe.cli import main

    paths = []
    for name, r in plain_runs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(r))
        paths.append(str(path))
    assert main(["report", *paths, "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("### Clinician's view") == 2
    assert "Positive class (the finding): **malignant**" in md and "| sensitivity (recall of the positive class) |" in md
    cm = plain_runs["pneumoniamnist"]["clinical"]["plain"]["confusion"]
    assert f"| pneumonia | {cm['tp']} (TP) | {cm['fn']} (FN) |" in md and "pneumoniamnist-plain-roc.png" in md
    assert (tmp_path / "rep" / "breastmnist-plain-roc.png").stat().st_size > 10_000

    # a report written before the block existed: computed again from its logits, the same tables
    old = {k: v for k, v in plain_runs["pneumoniamnist"].items() if k != "clinical"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["report", paths[0], "--out", str(tmp_path / "new")]) == 0
    assert main(["report", str(tmp_path / "old.json"), "--out", str(tmp_path / "old")]) == 0
    assert (tmp_path / "old" / "report.md").read_text() == (tmp_path / "new" / "report.md").read_text()
    # older still: a plain run without per-image logits renders, saying why the view is missing
    older = {k: v for k, v in old.items() if k != "logits"}
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert main(["report", str(tmp_path / "older.json"), "--out", str(tmp_path / "older")]) == 0
    assert "No clinician's view" in (tmp_path / "older" / "report.md").read_text()


@pytest.mark.slow
def test_cxr14_latent_multilabel_set_in_json_and_report(data_dir, tmp_path):
    from medhe.cli import main

    out = tmp_path / "cxr.json"
    assert main(["evaluate", "--model", "cxr14-latent", "--json", str(out), "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    r = json.loads(out.read_text())
    c = r["clinical"]["plain"]
    y, z = np.asarray(r["logits"]["labels"]), np.asarray(r["logits"]["plain"])
    assert c["kind"] == "multi-label" and len(c["per_label"]) == len(r["labels"]) == y.shape[1]
    assert [row["label"] for row in c["per_label"]] == r["labels"]
    assert c["subset_accuracy"]["value"] == pytest.approx(accuracy_score(y, (z > 0).astype(int)), abs=1e-6)
    assert c["auc"]["macro"]["value"] == pytest.approx(r["plain"]["auc"], abs=1e-5)
    assert c["f1"]["macro"]["value"] == pytest.approx(r["plain"]["f1"], abs=1e-6)
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "### Multi-label metrics (P1's set)" in md and "| subset accuracy (all labels right) |" in md
    assert f"| AUC {r['labels'][0]} (" in md and "| F1 weighted |" in md
