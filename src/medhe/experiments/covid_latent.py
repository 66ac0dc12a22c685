"""``covid-cxr-ckks``: a whole network under CKKS for the COVID-19 Radiography subset (COVID vs Normal).

P1's pipeline on a second dataset: the client runs the f8 VQ encoder (256x256 X-ray -> 4x32x32 latent), the server
runs ``latent-hecnn`` on the encrypted latent. The classifier is small enough that every tensor fits one ciphertext
at N=32768, so it does not depend on multi-ciphertext tensors. The encoder must not have seen this dataset's
val/test images (``medhe.models.train_autoencoder`` trains on the COVID *train* split only), the variant is chosen
on the validation split only, and the test split is scored once, for the chosen variant.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medhe import atomic
from medhe.errors import DataError
from medhe.experiments.latent import DEFAULT_CKKS_OPTIONS, DEFAULT_TRAIN, _logits, encode_images, \
    export_latent_model, logit_bound, train_classifier
from medhe.models.metrics import compute_metrics

COVID = "covid19_radiography_subset"
TASK = "binary-class"
#: the split the covid-cxr card records (medhe.data.folder: stratified by class, seed 0)
SPLIT_TEXT = "medhe deterministic stratified 70/15/15, seed 0"
#: the variants compared on validation: (classifier arch_kwargs, training overrides of DEFAULT_TRAIN). Width 16
#: is the widest whose first conv output (16x32x32 = 16384 values) still fits one N=32768 ciphertext.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "w8": ({"width": 8}, {}),
    "w8-shift2": ({"width": 8}, {"shift": 2}),
    "w8-flip-shift2": ({"width": 8}, {"flip": True, "shift": 2}),
    "w16-shift2": ({"width": 16}, {"shift": 2}),
    "w8-b3-shift2": ({"width": 8, "blocks": 3}, {"shift": 2}),
    "w16-b3-shift2": ({"width": 16, "blocks": 3}, {"shift": 2}),
    # image-space augmentation before the encoder (covid-cxr's Augment: rotation, shift, zoom, brightness,
    # contrast), 8 extra encoded copies of every training image; 30 epochs over the 9x larger set
    "w8-aug8": ({"width": 8}, {"augment_copies": 8, "epochs": 30}),
    "w16-aug8": ({"width": 16}, {"augment_copies": 8, "epochs": 30}),
    "w16-b3-aug8": ({"width": 16, "blocks": 3}, {"augment_copies": 8, "epochs": 30}),
    "w16-h8-aug8": ({"width": 16, "head_size": 8}, {"augment_copies": 8, "epochs": 30}),
}
#: training options handled here rather than by ``train_classifier``
_OWN_OPTIONS = ("augment_copies",)


def load_latents(encoder: torch.nn.Module, data_dir: str | None = None) -> tuple[dict[str, np.ndarray],
                                                                                    dict[str, np.ndarray], list[str]]:
    """Latents and labels of the three splits, computed as the client does (``PREPROCESS`` then the encoder)."""
    from medhe.data import load_dataset

    x, y, names = {}, {}, []
    for s in ("train", "val", "test"):
        ds = load_dataset(COVID, split=s, data_dir=data_dir)
        x[s] = encode_images(encoder, ds.images)
        y[s] = np.asarray(ds.labels).reshape(-1, 1)
        names = list(ds.label_names)
    return x, y, names


def train_covid_ckks(ae_dir: str | Path, out_dir: str | Path, variants: list[str] | None = None,
                     data_dir: str | None = None, command: str = "", log: Callable[[str], None] = print,
                     ckks_options: dict[str, Any] | None = None, only_train: bool = False) -> dict[str, Any]:
    """Train every variant on train, pick the best by val (AUC, then ACC), score only that one on test, export it.

    Writes ``out_dir/model`` (the artifact) and ``out_dir/selection.json`` (every variant's val metrics).
    ``only_train``: train the variants and keep them under ``out_dir/variants`` without selecting or touching the
    test split, so disjoint variant sets can train in parallel processes; a later full call reuses them.
    """
    from medhe.models.train_autoencoder import load_autoencoder

    names = variants or list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise DataError(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    ae, ae_card = load_autoencoder(ae_dir)
    if ae.factor != 8:
        raise DataError(f"{ae_dir} is an f{ae.factor} autoencoder; covid-cxr-ckks reads f8 latents")
    covid_data = str((ae_card.get("training", {}).get("data") or {}).get(COVID, ""))
    if not covid_data.startswith("train split"):
        raise DataError(f"{ae_dir} does not record training on the COVID train split only (it may have seen val/test "
                        "images): retrain it with medhe train-autoencoder --factor 8, which uses the train split only")
    x, y, labels = load_latents(ae.encoder, data_dir)
    from medhe.data import load_dataset

    train_images = load_dataset(COVID, split="train", data_dir=data_dir).images
    ae_sha = hashlib.sha256((Path(load_autoencoder_dir(ae_dir)) / "autoencoder.safetensors").read_bytes()).hexdigest()
    out = Path(out_dir)
    tried, models = [], {}
    for name in names:
        cached = _load_variant(out, name, ae_sha)
        if cached is not None:
            model, record, entry = cached
        else:
            arch, train = VARIANTS[name]
            t0 = time.perf_counter()
            copies = int(train.get("augment_copies", 0))
            x_tr, y_tr = x["train"], y["train"]
            if copies:
                x_tr = np.concatenate([x_tr, augmented_latents(ae.encoder, train_images, copies, out, ae_sha, log)])
                y_tr = np.concatenate([y_tr] + [y["train"]] * copies)
            opts = {k: v for k, v in train.items() if k not in _OWN_OPTIONS}
            model, record = train_classifier(x_tr, y_tr, x["val"], y["val"], arch_kwargs=arch,
                                             **{**DEFAULT_TRAIN, **opts}, task=TASK, log=log)
            record["augment_copies"] = copies
            val = compute_metrics(TASK, y["val"], _logits(model, x["val"]))
            entry = {"variant": name, "arch_kwargs": arch, "train": train, "val": val, "autoencoder_sha256": ae_sha,
                     "best_epoch": record["best_epoch"], "seconds": round(time.perf_counter() - t0, 1)}
            if only_train:
                _save_variant(out, name, model, record, entry)
        tried.append(entry)
        models[name] = (model, record)
        log(f"{name}: val ACC {entry['val']['acc']:.4f} AUC {entry['val']['auc']:.4f} (epoch {entry['best_epoch']})")
    if only_train:
        return {"tried": tried}
    chosen = max(tried, key=lambda t: (t["val"]["auc"], t["val"]["acc"]))
    model, record = models[chosen["variant"]]
    metrics = {s: compute_metrics(TASK, y[s], _logits(model, x[s])) for s in ("val", "test")}
    log(f"chosen on val: {chosen['variant']}; test (scored once) {metrics['test']}")
    record["variant"] = chosen["variant"]
    record["selected_on"] = "val AUC, then val ACC, among the variants in model_selection"
    record["autoencoder"] = {"dir": str(ae_dir), "factor": ae.factor, "metrics": ae_card.get("metrics"),
                             "data": ae_card.get("training", {}).get("data")}
    dataset = {"name": COVID, "split": SPLIT_TEXT, "size": 256,
               "sizes": {s: int(len(y[s])) for s in ("train", "val", "test")}}
    # The engine's logit bound estimated from the activation ranges (the cubic gate's range gives ~3e8) leaves a
    # 2^20 output scale and logit errors ~1; bound the logits by what train+val show instead, with a 2x margin.
    seen = max(float(np.abs(_logits(model, x[s])).max()) for s in ("train", "val"))
    bound = logit_bound(model, (x["train"], x["val"]))
    record["ckks_output_bound"] = {"value": bound, "max_abs_logit_train_val": round(seen, 3),
                                   "rule": "2 x max |logit| on train + val, rounded up to a power of two"}
    extra = {"model_selection": tried}
    path = export_latent_model(out / "model", ae, model, record, metrics, labels, name="covid-cxr-ckks",
                               command=command, extra=extra, task=TASK, dataset=dataset,
                               ckks_options=ckks_options or {**DEFAULT_CKKS_OPTIONS, "output_bound": bound})
    summary = {"chosen": chosen["variant"], "tried": tried, "metrics": metrics, "model": str(path)}
    atomic.write_json(out / "selection.json", summary)
    return summary


def load_autoencoder_dir(path: str | Path) -> Path:
    """The folder ``load_autoencoder`` reads for ``path`` (a folder, or a shipped autoencoder's name)."""
    from medhe.models.artifact import PRETRAINED_DIR

    p = Path(path).expanduser()
    return p if p.is_dir() else PRETRAINED_DIR / str(path)


def augmented_latents(encoder: torch.nn.Module, images: np.ndarray, copies: int, out: Path, ae_sha: str,
                      log: Callable[[str], None] = print, seed: int = 0) -> np.ndarray:
    """``copies`` randomly augmented encodings of every training image (in image space, before the encoder, as a
    client would see a differently positioned scan), cached under ``out`` for the encoder that made them."""
    from medhe.data import Preprocess
    from medhe.models.augment import Augment
    from medhe.models.train_autoencoder import PREPROCESS

    cache = out / "variants" / f"augmented-{copies}-{seed}-{ae_sha[:16]}.npy"
    if cache.is_file():
        return np.load(cache)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(Preprocess(**PREPROCESS).batch(images))
    aug = Augment()
    encoder.eval()
    parts = []
    with torch.no_grad():
        for k in range(copies):
            log(f"encoding augmented copy {k + 1}/{copies} of the training images")
            parts += [encoder(aug(x[i:i + 32], gen)).numpy() for i in range(0, len(x), 32)]
    z = np.concatenate(parts).astype(np.float32)
    import io

    buf = io.BytesIO()
    np.save(buf, z)
    atomic.write_bytes(cache, buf.getvalue())
    return z


def _variant_paths(out: Path, name: str) -> tuple[Path, Path]:
    return out / "variants" / f"{name}.pt", out / "variants" / f"{name}.json"


def _save_variant(out: Path, name: str, model: torch.nn.Module, record: dict[str, Any], entry: dict[str, Any]) -> None:
    """Keep a trained variant (weights with recorded activation ranges, training record, val entry) for reuse."""
    import io

    weights, meta = _variant_paths(out, name)
    buf = io.BytesIO()
    torch.save(model, buf)
    atomic.write_bytes(weights, buf.getvalue())
    atomic.write_json(meta, {"record": record, "entry": entry})


def _load_variant(out: Path, name: str, ae_sha: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]] | None:
    import json

    weights, meta = _variant_paths(out, name)
    if not (weights.is_file() and meta.is_file()):
        return None
    data = json.loads(meta.read_text())
    entry = data["entry"]
    if (entry.get("arch_kwargs"), entry.get("train"), entry.get("autoencoder_sha256")) != (*VARIANTS[name], ae_sha):
        return None  # the variant's definition or the encoder changed since: train it again
    model = torch.load(weights, weights_only=False)  # our own file, written by _save_variant above
    model.eval()
    return model, data["record"], data["entry"]
