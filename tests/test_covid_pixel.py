"""covid-cxr-ckks' pixel route: 128 px inputs from the same split as the latent route, selection across both
families on validation only, and no test split scored unless a pixel variant is the one chosen."""

import json

import numpy as np
import pytest

from medhe.experiments import covid_latent as cl
from medhe.experiments import covid_pixel as cp


def test_pixel_inputs_use_the_covid_split_at_128px(data_dir):
    """Same images and labels as the latent route's splits, preprocessed to 1x128x128 as the client does."""
    from medhe.data import load_dataset

    x, y, labels, raw = cp.load_pixels(str(data_dir))
    for s in ("train", "val", "test"):
        ds = load_dataset(cl.COVID, split=s, data_dir=str(data_dir))
        assert x[s].shape == (len(ds.images), 1, 128, 128) and x[s].dtype == np.float32
        assert np.array_equal(y[s].reshape(-1), np.asarray(ds.labels).reshape(-1))
    assert labels == ["COVID", "Normal"] and len(raw) == len(x["train"])
    assert -1.0 - 1e-6 <= x["val"].min() and x["val"].max() <= 1.0 + 1e-6  # mean 0.5, std 0.5 on [0, 1]


def test_augmented_pixels_are_seeded_warps_of_the_training_inputs(data_dir):
    x, _, _, _ = cp.load_pixels(str(data_dir))
    a = cp.augmented_pixels(x["train"][:8], 2, seed=3)
    assert a.shape == (16, 1, 128, 128)
    assert np.array_equal(a, cp.augmented_pixels(x["train"][:8], 2, seed=3))
    assert not np.allclose(a[:8], x["train"][:8])  # actually warped
    assert np.corrcoef(a[0].ravel(), x["train"][0].ravel())[0, 1] > 0.5  # still the same X-ray


def test_latent_family_enters_selection_by_val_scores_only(tmp_path):
    card = {"metrics": {"test": {"acc": 1.0, "auc": 1.0}},
            "model_selection": [{"variant": "w8", "arch_kwargs": {"width": 8}, "train": {},
                                 "val": {"acc": 0.8, "auc": 0.9}, "best_epoch": 3}]}
    (tmp_path / "card.json").write_text(json.dumps(card))
    entries = cp._latent_entries(tmp_path)
    assert [e["variant"] for e in entries] == ["latent-f8-w8"] and entries[0]["val"] == {"acc": 0.8, "auc": 0.9}
    assert "test" not in json.dumps(entries)
    from medhe.errors import DataError

    with pytest.raises(DataError, match="not found"):
        cp._latent_entries(tmp_path / "missing")


@pytest.mark.slow
def test_pixel_variant_losing_on_val_leaves_test_unscored(tmp_path, data_dir, monkeypatch):
    """A deliberately weak pixel variant (1 epoch, width 2) against a latent family that is better on val: the
    latent family is chosen, so nothing is exported and no test metric is computed; the trained variant is cached."""
    monkeypatch.setattr(cp, "VARIANTS", {"px-tiny": ({"width": 2}, {"epochs": 1})})
    latent = {"model_selection": [{"variant": "w16", "arch_kwargs": {"width": 16}, "train": {},
                                   "val": {"acc": 0.99, "auc": 0.999}, "best_epoch": 1}]}
    (tmp_path / "latent.json").write_text(json.dumps(latent))
    out = tmp_path / "run"
    result = cp.train_covid_pixel(out, data_dir=str(data_dir), latent_card=tmp_path / "latent.json", log=lambda m: None)
    assert result["chosen"] == "latent-f8-w16" and "metrics" not in result
    assert not (out / "model").exists()
    saved = json.loads((out / "selection.json").read_text())
    assert "test" not in json.dumps(saved)
    assert saved["tried"][0]["variant"] == "px-tiny" and 0 <= saved["tried"][0]["val"]["auc"] <= 1
    assert cp._load_variant(out, "px-tiny") is not None


def test_cli_names_an_unknown_pixel_variant(tmp_path, capsys):
    from medhe.cli import main

    rc = main(["experiment", "covid-ckks-pixel", "--variants", "px-nope", "--out", str(tmp_path), "--only-train"])
    err = capsys.readouterr().err
    assert rc != 0 and "px-nope" in err and "px128-w8-aug4" in err and "Traceback" not in err
