"""Training on real data end to end: a short run writes a loadable, self-describing artifact; CLI and augmentation."""

import copy
import json

import numpy as np
import pytest
import torch

from medhe.cli import main
from medhe.errors import MedheError
from medhe.models.artifact import load_artifact
from medhe.models.augment import Augment
from medhe.models.metrics import compute_metrics
from medhe.models.predict import evaluate_plain, model_inputs, predict_logits
from medhe.models.train import calibrate_threshold, subset_indices, train_model

SMALL = {"channels": 2, "hidden": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("model") / "pneu-small"
    artifact = train_model("pneumoniamnist", arch="hecnn", epochs=1, out_dir=out, seed=3, batch_size=32,
                           arch_kwargs=SMALL, data_dir=data_dir, limit=256, progress=False, calibrate="youden")
    return artifact


def test_short_training_run_writes_a_complete_card(trained):
    card = trained.card
    assert card["arch"] == "hecnn" and card["task"] == "binary-class" and card["labels"] == ["normal", "pneumonia"]
    assert card["arch_kwargs"] == {"in_channels": 1, "num_outputs": 2, "image_size": 28, **SMALL}
    assert card["dataset"] == {"name": "pneumoniamnist", "size": 28}
    assert card["preprocessing"]["size"] == 28 and card["preprocessing"]["channels"] == 1
    for split in ("val", "test"):
        assert set(card["metrics"][split]) == {"acc", "auc", "f1"}
        assert 0.0 <= card["metrics"][split]["acc"] <= 1.0
    ranges = card["activation_ranges"]
    assert list(ranges) == ["2", "6"] and all(lo < hi for lo, hi in ranges.values())
    training = card["training"]
    assert training["seed"] == 3 and training["epochs"] == 1 and training["n_train"] == 256
    assert training["command"].startswith("medhe train --dataset pneumoniamnist --arch hecnn --out ")
    assert "--epochs 1 --seed 3 " in training["command"] and "--calibrate youden" in training["command"]
    assert training["calibration"]["method"] == "youden on val"


def test_reloaded_artifact_reproduces_the_card_metrics(trained, data_dir):
    from medhe.data import load_dataset

    again = load_artifact(trained.path)
    test = load_dataset("pneumoniamnist", split="test", data_dir=data_dir)
    keep = subset_indices(len(test), 256, seed=3)
    x = model_inputs(again, test.images[keep])
    logits = predict_logits(again.model, x)
    assert logits.dtype == np.float64 and logits.shape == (256, 2)
    assert compute_metrics("binary-class", test.labels[keep], logits) == pytest.approx(trained.card["metrics"]["test"])
    report = evaluate_plain(again, limit=100, data_dir=data_dir)
    assert report["scheme"] == "plain" and report["n"] == 100 and report["dataset"] == "pneumoniamnist"
    assert report["plain"] == pytest.approx(compute_metrics("binary-class", test.labels[:100], logits_first(again, test)))


def logits_first(artifact, test, n=100):
    return predict_logits(artifact.model, model_inputs(artifact, test.images[:n]))


def test_ranges_cover_every_training_input_of_the_final_model(trained, data_dir):
    from medhe.data import load_dataset
    from medhe.models import layers

    train = load_dataset("pneumoniamnist", split="train", data_dir=data_dir)
    model = trained.model
    layers.reset_ranges(model)
    x = model_inputs(trained, train.images[subset_indices(len(train), 256, seed=3)])
    predict_logits(model, x)
    assert all(r is None for r in layers.activation_ranges(model).values())  # plain prediction does not record
    predict_logits(model, x, record=True)
    recorded, carded = layers.activation_ranges(model), trained.card["activation_ranges"]
    assert recorded.keys() == carded.keys()
    assert all(np.allclose(recorded[k], carded[k], rtol=1e-6) for k in carded)


def test_calibration_moves_the_threshold_without_changing_auc(trained, data_dir):
    from medhe.data import load_dataset

    val = load_dataset("pneumoniamnist", split="val", data_dir=data_dir)
    x = model_inputs(trained, val.images[:200])
    y = val.labels[:200]
    model = copy.deepcopy(trained.model)  # the fixture is shared: calibrate a copy
    before = compute_metrics("binary-class", y, predict_logits(model, x))
    info = calibrate_threshold(model, x, y, "acc")
    after = compute_metrics("binary-class", y, predict_logits(model, x))
    assert after["auc"] == pytest.approx(before["auc"])
    assert after["acc"] >= before["acc"] and after["acc"] == pytest.approx(info["val_acc"])


def test_same_seed_gives_identical_weights(tmp_path, data_dir):
    kw = dict(epochs=1, seed=5, batch_size=32, arch_kwargs=SMALL, data_dir=data_dir, limit=96, progress=False,
              ema=0.9)
    a = train_model("pneumoniamnist", out_dir=tmp_path / "a", **kw)
    b = train_model("pneumoniamnist", out_dir=tmp_path / "b", **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a.card["metrics"] == b.card["metrics"] and a.card["training"]["ema"] == 0.9
    with pytest.raises(MedheError, match="ema decay must be between 0 and 1"):
        train_model("pneumoniamnist", out_dir=tmp_path / "c", **{**kw, "ema": 1.5})


def test_cli_trains_and_prints_a_summary(tmp_path, data_dir, capsys):
    out = tmp_path / "cli-model"
    rc = main(["train", "--dataset", "pneumoniamnist", "--epochs", "1", "--out", str(out), "--limit", "64",
               "--batch-size", "16", "--arch-arg", "channels=2", "--arch-arg", "hidden=4", "--no-augment",
               "--data-dir", str(data_dir), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "val" in printed and "test" in printed and "ACC" in printed
    card = json.loads((out / "card.json").read_text())
    assert card["arch_kwargs"]["channels"] == 2 and card["training"]["augment"] is False
    assert "--no-augment" in card["training"]["command"]


@pytest.mark.parametrize("argv,message", [
    (["--arch", "hecn"], "did you mean 'hecnn'"),
    (["--arch-arg", "channels"], "is not KEY=VALUE"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--arch", "hecnn", "--quant-bits", "4"], "--quant-bits applies to --arch fcnn"),
    (["--arch-arg", "channles=4"], "rejected its arguments"),
])
def test_cli_errors_are_one_line(tmp_path, data_dir, capsys, argv, message):
    rc = main(["train", "--dataset", "pneumoniamnist", "--out", str(tmp_path / "m"), "--limit", "16",
               "--data-dir", str(data_dir), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_unknown_dataset_is_a_medhe_error(tmp_path, data_dir):
    with pytest.raises(MedheError, match="unknown dataset"):
        train_model("pneumoniamist", out_dir=tmp_path / "m", data_dir=data_dir, epochs=1, progress=False)


@pytest.mark.slow
def test_multi_label_folder_dataset_trains(tmp_path, data_dir):
    artifact = train_model("nih_chestxray14_subset", arch="hecnn", epochs=1, out_dir=tmp_path / "nih",
                           batch_size=32, arch_kwargs=SMALL, data_dir=data_dir, limit=64, progress=False,
                           class_balanced=True)
    assert artifact.task == "multi-label" and len(artifact.labels) == 14
    assert artifact.card["dataset"]["name"] == "nih_chestxray14_subset"
    assert artifact.card["arch_kwargs"]["num_outputs"] == 14


def test_augmentation_keeps_shape_is_seeded_and_can_be_off():
    x = torch.randn(8, 1, 28, 28)
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(Augment.off()(x), x)
    rgb = torch.randn(2, 3, 16, 16)
    assert Augment(hflip=True)(rgb).shape == rgb.shape


def test_a_network_that_is_not_a_classifier_is_refused(tmp_path, data_dir):
    from torch import nn

    from medhe.models.zoo import ARCHS, register_arch

    register_arch("test-features", lambda in_channels=1, num_outputs=2, image_size=28: nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 5)))
    try:
        with pytest.raises(MedheError, match=r"outputs of shape \(5,\), not one logit per class \(2\)"):
            train_model("pneumoniamnist", arch="test-features", out_dir=tmp_path / "m", data_dir=data_dir,
                        epochs=1, limit=16, progress=False)
    finally:
        ARCHS.pop("test-features")


def test_threshold_calibration_is_refused_for_multi_label(tmp_path, data_dir):
    with pytest.raises(MedheError, match="binary tasks only"):
        train_model("nih_chestxray14_subset", out_dir=tmp_path / "m", data_dir=data_dir, epochs=1, limit=16,
                    progress=False, calibrate="youden")


def test_split_model_pretrains_multi_label_and_transfers_only_the_extractor(data_dir):
    """The extractor/head trainer on real NIH images (14 findings, BCE), then its extractor as a starting point."""
    from medhe.data import Preprocess, load_dataset
    from medhe.models.mobilenet import build_mobilenetv2_extractor
    from medhe.models.train_extractor import train_split_model

    kwargs = {"in_channels": 1, "image_size": 32, "width_mult": 0.25, "feature_dim": 8, "blocks": "compact"}
    nih = load_dataset(data_dir / "nih_chestxray14_subset", split="all", channels=1)
    x = Preprocess(channels=1, size=32, crop=None, mean=0.5, std=0.5).batch(nih.images[:24])
    y = nih.labels[:24]
    with pytest.raises(ValueError, match="select='last'"):
        train_split_model(x, y, x[:0], y[:0], extractor_kwargs=kwargs, num_outputs=14, epochs=1, multi_label=True)
    pre = train_split_model(x, y, x[:0], y[:0], extractor_kwargs=kwargs, num_outputs=14, epochs=1,
                            multi_label=True, select="last")
    assert pre.head[-1].out_features == 14 and np.isfinite(pre.history[0]["train_loss"])
    assert "val_acc" not in pre.history[0]
    state = copy.deepcopy(pre.extractor.state_dict())
    # learning rate 0: the weights that come back are exactly the starting point
    fine = train_split_model(x[:8], np.array([0, 1] * 4), x[:4], np.array([0, 1, 0, 1]), extractor_kwargs=kwargs,
                             epochs=1, lr=0.0, init_extractor=state, select="last")
    assert all(torch.equal(state[k], v) for k, v in fine.extractor.named_parameters())
    assert fine.head[-1].out_features == 2
    fresh = build_mobilenetv2_extractor(**kwargs)
    with pytest.raises(ValueError, match="not both"):
        train_split_model(x[:8], np.zeros(8), x[:4], np.zeros(4), extractor_kwargs=kwargs, epochs=1,
                          init=(fresh.state_dict(), {}), init_extractor=state)
