"""Whole-network CKKS chest X-ray models trained on the larger real folders: ``medhe recipe cxr-ckks TARGET``.

    medhe recipe cxr-ckks covid-cxr-ckks --out runs/v2/covid-cxr-ckks
    medhe recipe cxr-ckks pneumonia-cxr-ckks --out runs/v2/pneumonia-cxr-ckks
    medhe recipe cxr-ckks cxr14-ckks --out runs/v2/cxr14-ckks

One recipe for the three because they differ only in data, input route and variants: each target trains its
variants (``latent-hecnn``, the network CKKS runs whole) on the folder's train split, keeps each variant's best
epoch by val AUC, chooses the variant by val AUC (then val ACC), scores the test split once for the chosen one, and
exports it with the CKKS output bound taken from train + val logits. ``--only-train`` trains a subset of variants
without selecting (parallel processes); a later full call reuses the cached variants.

Inputs: ``latent`` runs covid-cxr-ckks' f8 VQ encoder on the client (256 px -> 4x32x32, P1's route); ``pixel``
feeds the preprocessed image itself. That encoder was trained (unsupervised, no labels) on the NIH subset's and the
COVID *subset*'s train splits only (the shipped ``vq-f8`` saw every COVID subset image, so it is not used); the card
records how many of this folder's val/test images the encoder saw, and the test metrics on the ones it did not see
beside the whole split.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medhe import atomic
from medhe.errors import DataError

COVID_SUBSET = "covid19_radiography_subset"


@dataclass(frozen=True)
class Target:
    """What one shipped model is trained on and how its variants differ."""

    dataset: str
    task: str
    route: str  # "latent" (f8 encoder on the client) or "pixel"
    size: int  # the image side the client preprocesses to
    variants: dict[str, tuple[dict[str, Any], dict[str, Any]]]
    ckks: dict[str, Any]
    #: labels.csv column -> value selecting an audit subgroup reported beside the whole split (shortcut checks)
    audit: dict[str, Any] = field(default_factory=dict)
    positive_label: str | None = None
    about: str = ""


TARGETS: dict[str, Target] = {
    "covid-cxr-ckks": Target(
        dataset="covid19_radiography_large", task="binary-class", route="latent", size=256,
        variants={
            "w16-shift2": ({"width": 16}, {"shift": 2, "epochs": 24}),
            "w16-aug1-shift2": ({"width": 16}, {"shift": 2, "epochs": 16, "augment_copies": 1}),
            "w16-shift2-e48": ({"width": 16}, {"shift": 2, "epochs": 48}),
        },
        # 2^40: a few train+val outliers (|logit| up to 1.3e4) set a 2^15 output bound; 2^36 left 3.4e-2 errors
        ckks={"poly_degree": 32768, "scale_bits": 40},
        audit={"name": "adult-only", "column": "pediatric_kermany", "value": "0",
               "why": "the database's Normal class mixes in pediatric Kermany scans; COVID images are adults"},
        positive_label="COVID",
        about="COVID-19 vs Normal on 6,381 COVID-19 Radiography images, f8 latent route"),
    "pneumonia-cxr-ckks": Target(
        dataset="kermany_pneumonia_224", task="binary-class", route="pixel", size=128,
        variants={
            "px128-w8-shift4": ({"width": 8}, {"shift": 4, "epochs": 16}),
            "px128-w8-b3-shift4": ({"width": 8, "blocks": 3}, {"shift": 4, "epochs": 16}),
        },
        ckks={"poly_degree": 32768, "scale_bits": 40},
        positive_label="PNEUMONIA",
        about="pediatric pneumonia vs normal on 4,636 Kermany chest X-rays at 128 px (pixel route)"),
    "cxr14-ckks": Target(
        dataset="nih_chestxray14_64px", task="multi-label", route="pixel", size=64,
        variants={
            "px64-w8": ({"width": 8}, {"epochs": 60}),
            "px64-w8-shift2": ({"width": 8}, {"epochs": 60, "shift": 2}),
            "px64-w16-shift2": ({"width": 16}, {"epochs": 60, "shift": 2}),
            "px64-w8-flip-shift2": ({"width": 8}, {"epochs": 60, "shift": 2, "flip": True}),
        },
        ckks={"poly_degree": 32768, "scale_bits": 36},
        about="NIH ChestX-ray14, 14 labels, 1,106 images at 64 px (pixel route)"),
}
#: training options handled here rather than by ``train_classifier``
_OWN_OPTIONS = ("augment_copies",)
#: the model whose client stage is the f8 encoder (v1 and v2 of covid-cxr-ckks carry the same encoder weights)
ENCODER = "covid-cxr-ckks"


# -- inputs ----------------------------------------------------------------------------------------------------------
def load_splits(target: Target, data_dir: str | None) -> dict[str, Any]:
    from medhe.data import load_dataset

    return {s: load_dataset(target.dataset, split=s, data_dir=data_dir, channels=1) for s in ("train", "val", "test")}


def inputs(target: Target, images: np.ndarray, encoder: torch.nn.Module | None) -> np.ndarray:
    """What the server network receives for ``images``, computed as the client computes it."""
    from medhe.experiments.latent import encode_images, pixel_inputs

    return encode_images(encoder, images) if target.route == "latent" else pixel_inputs(images, target.size)


def augmented(target: Target, images: np.ndarray, copies: int, encoder: torch.nn.Module | None, cache: Path,
              log: Callable[[str], None], seed: int = 0) -> np.ndarray:
    """``copies`` randomly warped versions of every training image (image space, before any encoder), cached."""
    from medhe.data import Preprocess
    from medhe.experiments.latent import PIXEL_PREPROCESS
    from medhe.models.augment import Augment
    from medhe.models.train_autoencoder import PREPROCESS

    if cache.is_file():
        return np.load(cache)
    gen = torch.Generator().manual_seed(seed)
    pre = Preprocess(**PREPROCESS) if target.route == "latent" else Preprocess(size=target.size, **PIXEL_PREPROCESS)
    x = torch.from_numpy(pre.batch(images))
    aug = Augment()
    parts = []
    with torch.no_grad():
        for k in range(copies):
            log(f"augmented copy {k + 1}/{copies} of {len(x)} training images")
            for i in range(0, len(x), 32):
                xb = aug(x[i:i + 32], gen)
                parts.append((encoder(xb) if encoder is not None else xb).numpy())
    z = np.concatenate(parts).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, z)
    atomic.write_bytes(cache, buf.getvalue())
    return z


def encoder_overlap(splits: dict[str, Any], data_dir: str | None) -> tuple[dict[str, Any], set[str]]:
    """How many val/test images of this folder the f8 encoder trained on (it used the COVID subset's train split;
    same file names in the large folder, identical pixels per the data README), and those file names."""
    from medhe.data import load_dataset

    try:
        seen = set(load_dataset(COVID_SUBSET, split="train", data_dir=data_dir).paths or [])
    except DataError:
        return {"checked": False, "why": f"{COVID_SUBSET} not found"}, set()
    out: dict[str, Any] = {"checked": True, "encoder_train": f"{COVID_SUBSET} train split ({len(seen)} images)"}
    for s in ("val", "test"):
        paths = splits[s].paths or []
        out[f"{s}_seen_by_encoder"] = int(sum(p in seen for p in paths))
    return out, seen


# -- training --------------------------------------------------------------------------------------------------------
def _variant_files(out: Path, name: str) -> tuple[Path, Path]:
    return out / "variants" / f"{name}.pt", out / "variants" / f"{name}.json"


def train_variant(target: Target, name: str, x: dict, y: dict, raw_train: np.ndarray, encoder, out: Path,
                  log: Callable[[str], None]) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    from medhe.experiments.latent import DEFAULT_TRAIN, _logits, train_classifier
    from medhe.models.metrics import compute_metrics

    weights, meta = _variant_files(out, name)
    arch, train = target.variants[name]
    if weights.is_file() and meta.is_file():
        data = json.loads(meta.read_text())
        if (data["entry"].get("arch_kwargs"), data["entry"].get("train")) == (arch, train):
            model = torch.load(weights, weights_only=False)  # our own file, written below
            model.eval()
            return model, data["record"], data["entry"]
    t0 = time.perf_counter()
    copies = int(train.get("augment_copies", 0))
    x_tr, y_tr = x["train"], y["train"]
    if copies:
        cache = out / "variants" / f"augmented-{copies}.npy"
        x_tr = np.concatenate([x_tr, augmented(target, raw_train, copies, encoder, cache, log)])
        y_tr = np.concatenate([y_tr] + [y["train"]] * copies)
    opts = {k: v for k, v in train.items() if k not in _OWN_OPTIONS}
    log(f"{name}: training on {len(x_tr)} inputs of shape {tuple(x_tr.shape[1:])}")
    model, record = train_classifier(x_tr, y_tr, x["val"], y["val"], arch_kwargs=arch, task=target.task, log=log,
                                     **{**DEFAULT_TRAIN, **opts})
    record["augment_copies"] = copies
    entry = {"variant": name, "input": f"{target.route} {tuple(x['train'].shape[1:])}", "arch_kwargs": arch,
             "train": train, "val": compute_metrics(target.task, y["val"], _logits(model, x["val"])),
             "best_epoch": record["best_epoch"], "seconds": round(time.perf_counter() - t0, 1)}
    buf = io.BytesIO()
    torch.save(model, buf)
    atomic.write_bytes(weights, buf.getvalue())
    atomic.write_json(meta, {"record": record, "entry": entry})
    return model, record, entry


def run(target_name: str, out_dir: str | Path, variants: list[str] | None = None, data_dir: str | None = None,
        command: str = "", only_train: bool = False, log: Callable[[str], None] = print,
        encoder_dir: str | None = None) -> dict[str, Any]:
    """Train (or reuse) the variants; unless ``only_train``, select on val, score test once, export the model."""
    from medhe.experiments.latent import _logits, bound_for, max_abs_logit
    from medhe.models.metrics import compute_metrics

    target = TARGETS[target_name]
    names = variants or list(target.variants)
    unknown = [v for v in names if v not in target.variants]
    if unknown:
        raise DataError(f"unknown variant(s) {', '.join(unknown)} of {target_name}: use "
                        f"{', '.join(target.variants)}")
    torch.set_num_threads(1)
    out = Path(out_dir)
    splits = load_splits(target, data_dir)
    encoder, ae = None, None
    if target.route == "latent":
        from medhe.models.artifact import load_artifact

        source = load_artifact(encoder_dir or ENCODER)
        if source.client_model is None or (source.card.get("client_stage") or {}).get("arch") != "vq-encoder":
            raise DataError(f"{encoder_dir or ENCODER} has no VQ encoder client stage to take the latents from")
        encoder = source.client_model.eval()
        ae = dict(source.card["client_stage"])
        ae["training_data"] = (source.card.get("training_data") or {}).get("client_stage")
    cache = out / "variants" / "inputs.npz"
    if cache.is_file():
        with np.load(cache) as f:
            x = {s: f[s] for s in ("train", "val", "test")}
    else:
        log(f"computing the {target.route} inputs of {sum(len(d) for d in splits.values())} images")
        x = {s: inputs(target, splits[s].images, encoder) for s in ("train", "val", "test")}
        buf = io.BytesIO()
        np.savez(buf, **x)
        atomic.write_bytes(cache, buf.getvalue())
    y = {s: np.asarray(splits[s].labels) for s in ("train", "val", "test")}
    tried, models = [], {}
    for name in names:
        model, record, entry = train_variant(target, name, x, y, splits["train"].images, encoder, out, log)
        tried.append(entry)
        models[name] = (model, record)
        log(f"{name}: val ACC {entry['val']['acc']:.4f} AUC {entry['val']['auc']:.4f} (epoch {entry['best_epoch']})")
    if only_train:
        return {"tried": tried}
    chosen = max(tried, key=lambda t: (t["val"]["auc"] or 0.0, t["val"]["acc"]))
    model, record = models[chosen["variant"]]
    logits = {s: _logits(model, x[s]) for s in ("val", "test")}
    metrics: dict[str, Any] = {s: compute_metrics(target.task, y[s], logits[s]) for s in ("val", "test")}
    subgroups = audit_metrics(target, splits, y, logits, data_dir)
    overlap, seen = encoder_overlap(splits, data_dir) if target.route == "latent" else (None, set())
    if overlap and overlap.get("checked"):
        keep = np.array([p not in seen for p in splits["test"].paths])
        metrics["test_unseen_by_encoder"] = {"n": int(keep.sum()),
                                             **compute_metrics(target.task, y["test"][keep], logits["test"][keep])}
    metrics.update(subgroups)
    log(f"chosen on val: {chosen['variant']}; test (scored once) {metrics['test']}")
    seen_max = max_abs_logit(model, [x["train"], x["val"]])
    record.update(variant=chosen["variant"], selected_on="val AUC, then val ACC, among the variants in "
                  "model_selection", ckks_output_bound={"value": bound_for(seen_max),
                                                        "max_abs_logit_train_val": round(seen_max, 3),
                                                        "rule": "2 x max |logit| on train + val, rounded up to a "
                                                                "power of two"})
    path = export(target_name, target, out / "model", model, record, metrics, splits, command, tried, ae, overlap,
                  encoder)
    summary = {"chosen": chosen["variant"], "tried": tried, "metrics": metrics, "model": str(path)}
    atomic.write_json(out / "selection.json", summary)
    return summary


def audit_metrics(target: Target, splits: dict, y: dict, logits: dict, data_dir: str | None) -> dict[str, Any]:
    """Metrics on the audit subgroup of val and test (e.g. adult-only COVID images), beside the whole split."""
    from medhe.data.folder import audit_mask
    from medhe.models.metrics import compute_metrics

    out = {}
    for s in ("val", "test") if target.audit else ():
        keep = audit_mask(splits[s], target.audit, data_dir)
        if keep is None:
            raise DataError(f"{target.dataset} has no column {target.audit['column']!r} for the "
                            f"{target.audit['name']} audit")
        out[f"{s}_{target.audit['name']}"] = {"n": int(keep.sum()),
                                              **compute_metrics(target.task, y[s][keep], logits[s][keep])}
    return out


def export(name: str, target: Target, out_dir: Path, model, record: dict, metrics: dict, splits: dict, command: str,
           tried: list, ae: dict | None, overlap: dict | None, encoder=None) -> Path:
    from medhe.experiments.latent import PIXEL_PREPROCESS
    from medhe.models import layers
    from medhe.models.artifact import save_artifact
    from medhe.models.modelcard import complete_card, loaded_entry
    from medhe.models.train_autoencoder import PREPROCESS

    layers.check_he_friendly(model)
    labels = list(splits["train"].label_names)
    dataset = {"name": target.dataset, "split": "medhe deterministic 70/15/15, seed 0, grouped by the folder's "
               "group column (dataset.json)", "sizes": {s: len(splits[s]) for s in ("train", "val", "test")}}
    card: dict[str, Any] = {
        "name": name, "version": "2", "arch": "latent-hecnn", "arch_kwargs": record["arch_kwargs"],
        "task": target.task, "labels": labels, "dataset": dataset, "metrics": metrics,
        "activation_ranges": layers.activation_ranges(model),
        "training": {"command": command, **{k: v for k, v in record.items() if k not in ("arch", "arch_kwargs")}},
        "scheme_options": {"default_scheme": "ckks",
                           "ckks": {**target.ckks, "output_bound": record["ckks_output_bound"]["value"]}},
        "model_selection": tried, "about": target.about,
    }
    if target.positive_label:
        card["positive_label"] = target.positive_label
    if target.audit:
        card["audit"] = dict(target.audit)
    client = None
    if target.route == "latent":
        card["preprocessing"] = {**PREPROCESS, "size": target.size}
        card["client_stage"] = {"arch": "vq-encoder", "arch_kwargs": ae["arch_kwargs"],
                                "latent_shape": ae["latent_shape"], "encoder_data_overlap": overlap}
        client = encoder
    else:
        card["preprocessing"] = {**PIXEL_PREPROCESS, "size": target.size}
    data = loaded_entry(target.dataset, splits["train"], {s: len(splits[s]) for s in ("train", "val", "test")})
    data["split"] = dataset["split"]
    if ae and ae.get("training_data"):  # the encoder's own images (unsupervised), from the card it was taken from
        data["client_stage"] = ae["training_data"]
    return save_artifact(out_dir, model, complete_card(card, training_data=data), client_model=client)


# -- command line ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medhe recipe cxr-ckks", description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=sorted(TARGETS), help="; ".join(f"{k}: {t.about}" for k, t in TARGETS.items()))
    ap.add_argument("--out", required=True, help="working folder: variants/, selection.json and model/")
    ap.add_argument("--variants", nargs="+", default=None, help="a subset of the target's variants")
    ap.add_argument("--only-train", action="store_true", help="train the variants only (no selection, no test)")
    ap.add_argument("--data-dir", default=None, help="data folder (default: MEDHE_DATA)")
    ap.add_argument("--encoder", default=None, metavar="MODEL",
                    help=f"latent route: the model folder whose VQ encoder client stage makes the latents "
                         f"(default: the shipped {ENCODER}, whose encoder never saw the COVID subset's val/test)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "medhe recipe cxr-ckks " + " ".join(shlex.quote(a) for a in argv)
    t0 = time.perf_counter()
    summary = run(args.target, args.out, args.variants, args.data_dir, command, args.only_train,
                  log=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True),
                  encoder_dir=args.encoder)
    print(json.dumps({k: v for k, v in summary.items() if k != "tried"}, indent=1, default=str))
    return 0
