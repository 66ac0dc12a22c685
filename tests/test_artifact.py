"""Model directories: save/load round trip, the shipped defaults, and one-line errors for broken artifacts."""

import json
import shutil

import numpy as np
import pytest
import torch

from medhe.errors import ArtifactError
from medhe.models import layers
from medhe.models.architectures import build_hecnn
from medhe.models.artifact import PRETRAINED_DIR, load_artifact, pretrained_names, save_artifact

KWARGS = {"in_channels": 1, "num_outputs": 2, "image_size": 28, "channels": 2, "hidden": 4, "shared_act": True}


def _card(**over):
    card = {"name": "tiny", "arch": "hecnn", "arch_kwargs": dict(KWARGS), "task": "binary-class",
            "labels": ["normal", "pneumonia"], "dataset": {"name": "pneumoniamnist", "size": 28},
            "preprocessing": {"channels": 1, "size": 28, "crop": None, "mean": 0.5, "std": 0.5},
            "metrics": {}, "activation_ranges": {}, "training": {"command": "test", "seed": 0, "epochs": 0}}
    card.update(over)
    return card


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_hecnn(**KWARGS).eval()
    model(torch.randn(4, 1, 28, 28))  # record some ranges so the buffers are non-trivial
    out = save_artifact(tmp_path / "tiny", model, _card())
    return out, model


def _one_line_error(path) -> str:
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_round_trip_keeps_weights_ranges_and_card(saved):
    path, model = saved
    artifact = load_artifact(path)
    assert artifact.card == {"format": "medhe-model/1", **_card()}
    assert artifact.client_model is None and artifact.path == path
    x = torch.randn(3, 1, 28, 28)
    layers.set_recording(model, False)
    layers.set_recording(artifact.model, False)
    with torch.no_grad():
        assert torch.equal(model(x), artifact.model(x))
    assert layers.activation_ranges(artifact.model) == layers.activation_ranges(model)
    assert artifact.model[2] is artifact.model[6]  # the shared activation is rebuilt shared
    assert artifact.preprocess().size == 28


def test_missing_weights_is_a_one_line_error(saved):
    path, _ = saved
    (path / "model.safetensors").unlink()
    assert "model.safetensors is missing" in _one_line_error(path)


def test_truncated_weights_is_a_one_line_error(saved):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert "not a readable safetensors file" in _one_line_error(path)


def test_bad_json_is_a_one_line_error(saved):
    path, _ = saved
    (path / "card.json").write_text('{"name": "tiny", ')
    assert "card.json is not valid JSON" in _one_line_error(path)


def test_unknown_arch_is_a_one_line_error(saved):
    path, _ = saved
    (path / "card.json").write_text(json.dumps({"format": "medhe-model/1", **_card(arch="hecnnn")}))
    assert "unknown architecture 'hecnnn'" in _one_line_error(path)


def test_weights_of_another_architecture_are_refused(saved):
    path, _ = saved
    (path / "card.json").write_text(json.dumps({"format": "medhe-model/1", **_card(arch="fcnn",
                                                                                   arch_kwargs={"hidden": 4})}))
    assert "does not match architecture" in _one_line_error(path)


def test_missing_card_keys_and_unknown_names(saved, tmp_path):
    path, _ = saved
    card = _card()
    del card["labels"]
    (path / "card.json").write_text(json.dumps({"format": "medhe-model/1", **card}))
    assert "lacks labels" in _one_line_error(path)
    with pytest.raises(ArtifactError, match="no model 'no-such-model'"):
        load_artifact("no-such-model")
    with pytest.raises(ArtifactError, match="card.json is missing"):
        load_artifact(tmp_path)


def test_an_invalid_card_is_never_written(tmp_path):
    with pytest.raises(ArtifactError, match="task 'regression'"):
        save_artifact(tmp_path / "bad", build_hecnn(), _card(task="regression"))
    assert not (tmp_path / "bad" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["pneumoniamnist", "breastmnist"])
def test_shipped_defaults_are_small_he_friendly_and_self_describing(name, tmp_path):
    if name not in pretrained_names():
        pytest.fail(f"shipped model {name!r} is missing from {PRETRAINED_DIR}")
    artifact = load_artifact(name)
    size = sum(f.stat().st_size for f in (PRETRAINED_DIR / name).iterdir())
    assert size < 1_000_000
    layers.check_he_friendly(artifact.model)
    assert len(layers.activation_sites(artifact.model)) >= 2
    card = artifact.card
    assert card["dataset"]["name"] == name and card["training"]["command"].startswith("medhe train")
    assert all(r is not None and r[0] < r[1] for r in card["activation_ranges"].values())
    copy = shutil.copytree(PRETRAINED_DIR / name, tmp_path / name)
    assert np.allclose(load_artifact(copy).model[0].weight.detach().numpy(),
                       artifact.model[0].weight.detach().numpy())
