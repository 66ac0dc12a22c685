"""Add the model card v2 fields to every shipped card (src/medhe/pretrained/*), reproducibly; weights untouched.

    MEDHE_DATA=/path/to/data python -m medhe.models.shipped_cards          # add missing fields
    MEDHE_DATA=/path/to/data python -m medhe.models.shipped_cards --check  # recompute, compare

Fields a card already has are kept (so a second run changes nothing, and "version": "2" stays "2"); --force
rewrites them. The shipped weights recorded no training commit, so ``code_revision`` is the checkout this script
runs in, and ``code_revision_source`` says so and names the commit that last changed the weights. ``created`` is
that commit's date. What is known about each model beyond its data (encoder images, weak figures) is listed below.
New cards get the same fields from ``medhe train`` and the recipes (medhe.models.modelcard.complete_card).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from medhe import atomic
from medhe.models import modelcard as mc
from medhe.models.artifact import PRETRAINED_DIR
from medhe.revision import code_revision

NIH, COVID = "nih_chestxray14_subset", "covid19_radiography_subset"

#: client-stage encoders' own (unsupervised) training images: only recorded in prose before v2
ENCODER_DATA = {
    # covid-cxr-ckks' encoder is the v1 covid-cxr-ckks encoder: NIH subset + COVID subset train (recipes/cxr_ckks.py)
    "covid-cxr-ckks": ([(NIH, ["train"]), (COVID, ["train"])],
                       "the f8 VQ encoder (client stage), trained without labels on these images; "
                       "client_stage.encoder_data_overlap counts the val/test images of this model it saw"),
    # vq-f8 was trained on 1,101 images = NIH subset train (291) + the whole COVID subset (810)
    "cxr14-latent": ([(NIH, ["train"]), (COVID, ["all"])],
                     "the shipped vq-f8 encoder (client stage), trained without labels on these 1,101 images"),
}
VQ_F8_DATA = ([(NIH, ["train"]), (COVID, ["all"])],
              "1,101 training images (training.n_train_images) = NIH subset train (291) + the whole COVID subset "
              "(810): when vq-f8 was trained, medhe.models.train_autoencoder used the COVID subset whole; it now "
              "uses its train split only")

EXTRA_LIMITATIONS = {
    "covid-cxr": ["fitted on train + val, so its val figures are not held out (metrics.val_not_held_out); the 122 "
                  "test images are the only unbiased estimate"],
    "covid-cxr-ckks": ["its client-stage encoder saw 84 val and 92 test images without labels; "
                       "metrics.test_unseen_by_encoder reports the other 865",
                       "adult-only figures (metrics.*_adult-only) are the ones free of the pediatric shortcut"],
    "cxr14-ckks": ["test macro AUC 0.566 (n = 166): close to chance; a demonstration of a 14-label model under "
                   "CKKS, not a useful classifier"],
    "cxr14-latent": ["test macro AUC 0.534 (n = 63): close to chance; a demonstration of the latent route, not a "
                     "useful classifier",
                     "its vq-f8 encoder saw the COVID subset whole, never the NIH val/test images"],
    "pneumoniamnist-qfcnn": ["3-bit weights, 4-bit activations: below the float model (metrics.float_unquantized)"],
    "breastmnist-qfcnn": ["3-bit weights, 4-bit activations: below the float model (metrics.float_unquantized)"],
    "vq-f8": ["an autoencoder, not a classifier: it compresses 256 px chest X-rays to a 4x32x32 latent (held-out "
              "PSNR 26.6 dB, SSIM 0.80); fine detail is lost"],
}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                          cwd=PRETRAINED_DIR).stdout.strip()


def parts_block(spec: tuple[list, str]) -> dict[str, Any]:
    entries, note = spec
    return {"parts": [mc.data_entry(name, splits) for name, splits in entries], "note": note}


def v2_fields(folder: Path, card: dict[str, Any], weights: str) -> dict[str, Any]:
    name = folder.name
    if name == "vq-f8":
        data = parts_block(VQ_F8_DATA)
    else:
        data = mc.card_training_data(card)
        if name in ENCODER_DATA:
            data["client_stage"] = parts_block(ENCODER_DATA[name])
    datasets = [p["dataset"] for label, p in mc.parts(data) if not label.startswith("client_stage")]
    commit = git("log", "-1", "--format=%H", "--", weights)
    return {
        "version": str(card.get("version") or "1"),
        "license": mc.SHIPPED_LICENSE,
        "license_note": "the weights are released under medhe's own license (pyproject.toml); the training data's "
                        "terms (training_data.terms) still apply to the data and may restrict use of models "
                        "derived from it",
        "intended_use": mc.INTENDED_USE,
        "limitations": mc.limitations(card, datasets) + EXTRA_LIMITATIONS.get(name, []),
        "training_data": data,
        "code_revision": code_revision(),
        "code_revision_source": f"card upgrade: the training commit was not recorded, so this is the revision at "
                                f"which the v2 fields were added; the weights were last changed in commit {commit}",
        "weights_commit": commit,
        "created": git("log", "-1", "--format=%as", "--", weights),
        "created_source": "date of the commit that last changed the weights",
    }


def upgrade(folder: Path, force: bool) -> list[str]:
    card_file = folder / ("autoencoder.json" if (folder / "autoencoder.json").is_file() else "card.json")
    weights = "autoencoder.safetensors" if card_file.name == "autoencoder.json" else "model.safetensors"
    card = json.loads(card_file.read_text())
    new = v2_fields(folder, card, str(folder / weights))
    added = [k for k in new if force or k not in card]
    if not added:
        return []
    out: dict[str, Any] = {}
    for key, value in card.items():
        out[key] = new[key] if key in added else value
        if key == "name" and "version" in added:
            out["version"] = new["version"]  # where the v2 chest X-ray cards already have it
    for key in added:
        out.setdefault(key, new[key])
    atomic.write_json(card_file, out)
    return added


def check(folder: Path) -> bool:
    card_file = folder / ("autoencoder.json" if (folder / "autoencoder.json").is_file() else "card.json")
    card = json.loads(card_file.read_text())
    missing = mc.missing_fields(card)
    rows = mc.verify(card.get("training_data") or {})
    ok = not missing and all(r["match"] is not False for r in rows)
    for r in rows:
        state = {True: "ok", False: "MISMATCH", None: "not checked (" + r.get("why", "no data") + ")"}[r["match"]]
        print(f"{folder.name} {r['part']} {r['dataset']}: {state}")
    if missing:
        print(f"{folder.name}: missing {', '.join(missing)}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="recompute the fingerprints and compare; change nothing")
    ap.add_argument("--force", action="store_true", help="rewrite v2 fields a card already has")
    args = ap.parse_args(argv)
    folders = sorted(p for p in PRETRAINED_DIR.iterdir() if p.is_dir())
    if args.check:
        return 0 if all([check(f) for f in folders]) else 1
    for folder in folders:
        added = upgrade(folder, args.force)
        print(f"{folder.name}: {'added ' + ', '.join(added) if added else 'already v2'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
