"""The v2 chest X-ray recipe (``medhe recipe cxr-ckks``) and the audit subgroup of ``medhe evaluate``, on the real
larger folders of the data directory."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medhe.data import load_dataset, resolve_data_dir
from medhe.data.folder import audit_mask
from medhe.recipes import cxr_ckks

LARGE = "covid19_radiography_large"
AUDIT = cxr_ckks.TARGETS["covid-cxr-ckks"].audit


def _large_or_skip():
    root = resolve_data_dir(None)
    if not (root / LARGE / "labels.csv").is_file():
        pytest.skip(f"{LARGE} is not in the data folder")
    return root / LARGE


def test_audit_mask_selects_the_adult_rows_of_the_csv():
    folder = _large_or_skip()
    ds = load_dataset(LARGE, split="test")
    mask = audit_mask(ds, AUDIT)
    with open(folder / "labels.csv", newline="") as f:
        flag = {r["path"]: r["pediatric_kermany"] for r in csv.DictReader(f)}
    assert mask.shape == (len(ds),)
    assert mask.tolist() == [flag[p] == "0" for p in ds.paths]
    # every pediatric image is Normal (label 1), so the adult-only subgroup holds every COVID image of the split
    assert 0 < (~mask).sum() < len(ds)
    assert (ds.labels[~mask, 0] == 1).all()
    assert (ds.labels[:, 0] == 0).sum() == (ds.labels[mask, 0] == 0).sum()


def test_audit_mask_is_none_without_the_column():
    _large_or_skip()
    ds = load_dataset(LARGE, split="val")
    assert audit_mask(ds, {"column": "no_such_column", "value": "0"}) is None


def test_grouped_split_keeps_near_twins_together():
    _large_or_skip()
    groups = {s: set(load_dataset(LARGE, split=s).groups.tolist()) for s in ("train", "val", "test")}
    assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    assert not groups["train"] & groups["val"]


@pytest.mark.slow
def test_recipe_trains_selects_on_val_and_exports_an_audited_card(tmp_path, monkeypatch):
    """A real (tiny) run of the recipe: 32 px pixels, one epoch per variant, on the real COVID folder."""
    _large_or_skip()
    small = cxr_ckks.Target(dataset=LARGE, task="binary-class", route="pixel", size=32,
                            variants={"a": ({"width": 4}, {"epochs": 1}), "b": ({"width": 4}, {"epochs": 2})},
                            ckks={"poly_degree": 32768, "scale_bits": 36}, audit=dict(AUDIT), positive_label="COVID")
    monkeypatch.setitem(cxr_ckks.TARGETS, "tiny-covid", small)
    summary = cxr_ckks.run("tiny-covid", tmp_path, command="medhe recipe cxr-ckks tiny-covid", log=lambda m: None)
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    vals = {t["variant"]: t["val"]["auc"] for t in summary["tried"]}
    assert summary["chosen"] == max(vals, key=vals.get)
    assert card["positive_label"] == "COVID" and card["audit"]["column"] == "pediatric_kermany"
    assert card["metrics"]["test_adult-only"]["n"] < card["dataset"]["sizes"]["test"]
    assert card["scheme_options"]["ckks"]["output_bound"] >= card["training"]["ckks_output_bound"][
        "max_abs_logit_train_val"]
    assert [t["variant"] for t in card["model_selection"]] == ["a", "b"]
    # the variants are cached: a second call reuses them and selects the same one
    again = cxr_ckks.run("tiny-covid", tmp_path, command="x", log=lambda m: None)
    assert again["chosen"] == summary["chosen"]
    assert np.isclose(again["metrics"]["test"]["auc"], summary["metrics"]["test"]["auc"])

    from medhe.cli.evaluate import evaluate

    report = evaluate(str(tmp_path / "model"), "plain", progress=False)
    assert report["audit"]["name"] == "adult-only"
    assert report["audit"]["n"] == card["metrics"]["test_adult-only"]["n"]
    assert np.isclose(report["audit"]["plain"]["auc"], card["metrics"]["test_adult-only"]["auc"])


SHIPPED = ("covid-cxr-ckks", "pneumonia-cxr-ckks", "cxr14-ckks")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_v2_model_matches_its_card(name):
    """Each shipped v2 model: HE-friendly, CKKS by default, trained on its recipe's folder, the chosen variant best
    on val among those recorded, and the card's val/test metrics are what the shipped weights give."""
    from medhe.experiments.latent import _logits
    from medhe.models.artifact import load_artifact
    from medhe.models.layers import check_he_friendly
    from medhe.models.metrics import compute_metrics
    from medhe.models.predict import model_inputs

    target = cxr_ckks.TARGETS[name]
    root = resolve_data_dir(None)
    if not (root / target.dataset / "labels.csv").is_file():
        pytest.skip(f"{target.dataset} is not in the data folder")
    art = load_artifact(name)
    card = art.card
    check_he_friendly(art.model)
    assert card["dataset"]["name"] == target.dataset and card["version"] == "2"
    assert card["scheme_options"]["default_scheme"] == "ckks" and card["task"] == target.task
    assert card["training"]["command"].startswith(f"medhe recipe cxr-ckks {name} ")
    chosen = max(card["model_selection"], key=lambda t: (t["val"]["auc"], t["val"]["acc"]))
    assert chosen["variant"] == card["training"]["variant"]
    for split in ("val", "test"):
        ds = load_dataset(target.dataset, split=split)
        assert len(ds) == card["dataset"]["sizes"][split]
        logits = _logits(art.model, model_inputs(art, ds.images))
        m = compute_metrics(target.task, ds.labels, logits)
        assert m["auc"] == pytest.approx(card["metrics"][split]["auc"], abs=1e-4)
        if split == "val":
            assert card["scheme_options"]["ckks"]["output_bound"] >= 2 * np.abs(logits).max()
    if target.audit:
        assert card["metrics"][f"test_{target.audit['name']}"]["n"] > 0


def test_evaluate_sample_spreads_over_the_split_and_keeps_the_audit():
    """--sample N takes every k-th image, so a class-sorted folder still gives both classes (--limit would not)."""
    _large_or_skip()
    from medhe.cli.evaluate import evaluate

    report = evaluate("covid-cxr-ckks", "plain", sample=30, progress=False)
    assert report["n"] == 30 and report["sample"]["requested"] == 30
    labels = np.asarray(report["logits"]["labels"]).reshape(-1)
    assert set(labels.tolist()) == {0, 1}
    assert report["plain"]["auc"] is not None  # both classes are in
    assert 0 < report["audit"]["n"] <= 30
