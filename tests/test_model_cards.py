"""Model cards v2 (docs/model-cards.md): every shipped card has the fields, its training-data fingerprint recomputes
from the real data (independently of medhe for the small sets), older cards still load, new cards get the fields,
and evaluation reports and prediction outputs name model, version and code revision."""

import copy
import csv
import datetime
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess

import numpy as np
import pytest

from medhe.cli import main
from medhe.data.fingerprint import ARRAYS, FILES, split_names
from medhe.models import modelcard as mc
from medhe.models.artifact import PRETRAINED_DIR, load_artifact, provenance, read_card
from medhe.revision import code_revision

SHIPPED = sorted(p for p in PRETRAINED_DIR.iterdir()
                 if (p / "card.json").is_file() or (p / "autoencoder.json").is_file())
SMALL = ("pneumoniamnist", "pneumoniamnist-p3", "pneumoniamnist-qfcnn", "breastmnist", "breastmnist-qfcnn")
HEX40, HEX64 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")


def _card(folder):
    name = "card.json" if (folder / "card.json").is_file() else "autoencoder.json"
    return json.loads((folder / name).read_text())


def _git_head():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PRETRAINED_DIR, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def test_every_shipped_model_is_listed():
    assert {p.name for p in SHIPPED} >= {"pneumoniamnist", "breastmnist", "covid-cxr", "covid-cxr-ckks", "cxr14-ckks",
                                         "cxr14-latent", "pneumonia-cxr-ckks", "vq-f8"}


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_card_has_every_v2_field(folder):
    card = _card(folder)
    assert mc.missing_fields(card) == []
    assert isinstance(card["version"], str) and card["version"]
    assert card["license"] == mc.SHIPPED_LICENSE and "not validated for clinical use" in card["intended_use"]
    assert isinstance(card["limitations"], list) and len(card["limitations"]) >= 3
    assert HEX40.fullmatch(card["code_revision"]) and card["code_revision_source"].startswith("card upgrade")
    datetime.date.fromisoformat(card["created"])
    parts = mc.parts(card["training_data"])
    assert parts and all(HEX64.fullmatch(p["sha256"]) and p["hash_scheme"] in (FILES, ARRAYS) for _, p in parts)
    for _, p in parts:  # each dataset's terms travel with the model
        assert p["terms"] and p["n"] > 0 and set(p["sizes"]) == {"train", "val", "test"}
    recorded = (card.get("dataset") or {}).get("sizes")
    if recorded:
        assert card["training_data"]["sizes"] == recorded


def test_versions_keep_their_meaning():
    """The v2 chest X-ray models stay "2"; the others are the first versioned release of their name."""
    versions = {p.name: _card(p)["version"] for p in SHIPPED}
    assert {versions[n] for n in ("covid-cxr-ckks", "pneumonia-cxr-ckks", "cxr14-ckks")} == {"2"}
    assert versions["pneumoniamnist"] == versions["covid-cxr"] == "1"


def test_known_biases_are_in_the_limitations():
    text = {p.name: " ".join(_card(p)["limitations"]) for p in SHIPPED}
    assert "pediatric" in text["covid-cxr-ckks"] and "adult-only" in text["covid-cxr-ckks"]
    assert "NLP-mined" in text["cxr14-ckks"] and "noisy" in text["cxr14-latent"]
    assert "pediatric" in text["pneumonia-cxr-ckks"] and "28x28" in text["pneumoniamnist"]
    assert "not held out" in text["covid-cxr"]


def test_weights_are_those_the_card_was_written_for():
    """``weights_commit`` is the last commit that changed the weights: if they changed since, the card is stale."""
    if _git_head() is None:
        pytest.skip("not a git checkout")
    for folder in SHIPPED:
        weights = folder / ("model.safetensors" if (folder / "card.json").is_file() else "autoencoder.safetensors")
        last = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(weights)], cwd=PRETRAINED_DIR,
                              capture_output=True, text=True, check=True).stdout.strip()
        assert _card(folder)["weights_commit"] == last, folder.name


@pytest.mark.parametrize("name", SMALL)
def test_medmnist_fingerprint_recomputes_without_medhe(name, data_dir):
    """The recipe docs/model-cards.md gives a hospital: numpy and hashlib on the official .npz."""
    entry = _card(PRETRAINED_DIR / name)["training_data"]
    assert entry["hash_scheme"] == ARRAYS and entry["trained_on"] == ["train"]
    with np.load(data_dir / f"{entry['dataset']}.npz") as z:
        h = hashlib.sha256(z["train_images"].tobytes())
        h.update(z["train_labels"].astype("<i8").tobytes())
    assert h.hexdigest() == entry["sha256"]
    assert [r["match"] for r in mc.verify(entry, data_dir)] == [True]


def test_folder_fingerprints_recompute_from_the_real_data(data_dir):
    """Every folder-trained card (and each client-stage encoder's images): names only, no image decoded."""
    checked = 0
    for folder in SHIPPED:
        data = _card(folder)["training_data"]
        for label, entry in mc.parts(data):
            if entry["hash_scheme"] != FILES:
                continue
            names = [n for s in entry["trained_on"] for n in split_names(data_dir / entry["dataset"], s)]
            assert hashlib.sha256("".join(f"{n}\n" for n in sorted(names)).encode()).hexdigest() == entry["sha256"], \
                f"{folder.name} {label}"
            assert len(names) == entry["n"]
            checked += 1
    assert checked >= 8


def test_split_names_are_the_loaders_split(data_dir):
    from medhe.data import load_dataset

    for split in ("train", "test"):
        assert split_names(data_dir / "nih_chestxray14_64px", split) == \
            load_dataset("nih_chestxray14_64px", split=split, data_dir=data_dir).paths


def test_a_card_from_before_v2_loads_with_a_warning_and_reads_unknown(tmp_path, caplog):
    old = shutil.copytree(PRETRAINED_DIR / "pneumoniamnist", tmp_path / "old")
    card = json.loads((old / "card.json").read_text())
    for key in [*mc.V2_FIELDS, "code_revision_source"]:
        card.pop(key)
    (old / "card.json").write_text(json.dumps(card))
    with caplog.at_level(logging.WARNING, logger="medhe.models.modelcard"):
        art = load_artifact(old)
    assert "before model cards v2" in caplog.text and "version" in caplog.text
    assert set(mc.summary(art.card).values()) == {"unknown"}
    assert provenance(old)["model_version"] == "unknown"


def test_complete_card_fills_what_is_missing_and_keeps_what_is_set(data_dir):
    base = {k: v for k, v in read_card(PRETRAINED_DIR / "breastmnist").items() if k not in mc.V2_FIELDS}
    card = mc.complete_card({**base, "version": "7"}, data_dir=data_dir)
    assert mc.missing_fields(card) == [] and card["version"] == "7" and card["license"] == mc.NEW_LICENSE
    assert card["training_data"]["sha256"] == read_card(PRETRAINED_DIR / "breastmnist")["training_data"]["sha256"]
    assert card["code_revision"] == code_revision() and card["created"] == datetime.date.today().isoformat()
    head = _git_head()
    assert card["code_revision"] == (head or "unknown")
    missing = mc.complete_card({"name": "x", "dataset": {"name": "no_such_folder"}}, data_dir=data_dir)
    assert missing["training_data"]["sha256"] == "unknown" and missing["training_data"]["why_unknown"]


def test_medhe_train_writes_v2_fields_for_the_subset_it_trained_on(tmp_path, data_dir):
    import torch

    from medhe.data import load_dataset
    from medhe.models.train import subset_indices, train_model

    torch.set_num_threads(1)
    art = train_model("breastmnist", arch="hecnn", epochs=1, out_dir=tmp_path / "m", batch_size=32, limit=64,
                      arch_kwargs={"channels": 2, "hidden": 4}, data_dir=data_dir, progress=False,
                      card_extras={"version": "3"})
    card = art.card
    assert mc.missing_fields(card) == [] and card["version"] == "3" and "--limit 64" in card["training_data"]["note"]
    train = load_dataset("breastmnist", split="train", data_dir=data_dir)
    keep = subset_indices(len(train), 64, 0)
    h = hashlib.sha256(train.images[keep].tobytes())
    h.update(train.labels[keep].astype("<i8").tobytes())
    assert card["training_data"]["sha256"] == h.hexdigest() and card["training_data"]["n"] == 64


def test_plain_evaluate_report_names_model_version_and_code_revision(data_dir):
    from medhe.cli.evaluate import dumps, evaluate
    from medhe.he.report import check_provenance

    report = json.loads(dumps(evaluate("pneumoniamnist", "plain", limit=8, data_dir=str(data_dir), progress=False)))
    card = read_card(PRETRAINED_DIR / "pneumoniamnist")
    assert check_provenance(report) == []
    p = report["provenance"]
    assert report["model"] == p["model"] == "pneumoniamnist" and report["model_version"] == card["version"]
    assert p["model_code_revision"] == card["code_revision"] and p["code_revision"] == (_git_head() or "unknown")
    weights = (PRETRAINED_DIR / "pneumoniamnist" / "model.safetensors").read_bytes()
    assert p["weights_sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    assert "missing provenance" in check_provenance({k: v for k, v in report.items() if k != "provenance"})
    stale = copy.deepcopy(report)
    stale["provenance"]["model_version"] = "9"
    assert check_provenance(stale) == ["provenance.model_version differs from model_version"]


def test_medhe_models_lists_and_verifies(capsys, data_dir):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(p.name in out for p in SHIPPED) and "Apache-2.0" in out
    assert main(["models", "breastmnist", "vq-f8", "--json", "--verify-data", "--data-dir", str(data_dir)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == ["breastmnist", "vq-f8"]
    assert all(row["match"] for r in records for row in r["data_check"]) and records[1]["kind"].startswith("auto")
    assert main(["models", "pneumonia-cxr-ckks"]) == 0
    text = capsys.readouterr().out
    assert "pneumonia-cxr-ckks v2" in text and "sha256" in text and "limitations:" in text


def test_medhe_models_flags_a_mismatch_and_an_old_card(tmp_path, capsys, data_dir):
    bad = shutil.copytree(PRETRAINED_DIR / "breastmnist", tmp_path / "bad")
    card = json.loads((bad / "card.json").read_text())
    card["training_data"]["sha256"] = "0" * 64
    card.pop("license")
    (bad / "card.json").write_text(json.dumps(card))
    assert main(["models", str(bad), "--verify-data", "--data-dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "card predates v2: no license" in out


def test_inspect_header_names_the_card():
    from medhe.cli.inspect import card_block, card_header

    block = card_block(read_card(PRETRAINED_DIR / "cxr14-ckks"))
    assert block["version"] == "2" and block["training_data"][0]["dataset"] == "nih_chestxray14_64px"
    assert "version 2" in card_header(block) and block["training_data"][0]["sha256"] in card_header(block)


def test_listing_and_predictions_name_model_and_version():
    from medhe.cli.predict_batch import render
    from medhe.service.catalog import load_catalog
    from medhe.service.client import interpret

    info = load_catalog(["cxr14-ckks"])[0].describe()
    assert info["version"] == "2" and info["card"]["license"] == "Apache-2.0"
    d = interpret("binary-class", ["normal", "pneumonia"], np.array([0.1, 0.9]), "pneumoniamnist", "a.png",
                  version="1")
    assert d.to_dict()["model_version"] == "1" and d.to_dict()["model"] == "pneumoniamnist"
    rows = list(csv.DictReader(io.StringIO(render([d], [], "csv", "http://x", "pneumoniamnist", "1"))))
    assert rows[0]["model"] == "pneumoniamnist" and rows[0]["model_version"] == "1"
    doc = json.loads(render([d], [], "json", "http://x", "pneumoniamnist", "1"))
    assert doc["model_version"] == "1" and doc["results"][0]["model_version"] == "1"
