"""P1's cost/accuracy curve: one latent classifier per downsampling factor, plain and under CKKS, in one table.

For each factor f in {2, 4, 8, 16} the client-side VQ encoder turns 256x256 chest X-rays into a (c, 256/f, 256/f)
latent, the same HE-friendly classifier builder (``latent-hecnn``) is trained on it (multi-label BCE, model selection
on val macro AUC), and the test split is scored in plaintext and — when the CKKS engine compiles the model —
encrypted. Pixel-space rows use the same classifier on downsampled images: 64x64 has exactly as many input values
as the f8 latent (4x32x32), and 256x256 is the full-resolution comparison. The test split has 63 images, so every
macro AUC carries a bootstrap confidence interval.

``export_latent_model`` writes the shipped ``cxr14-latent`` (server = classifier, client stage = f8 encoder); the f8
row of the experiment uses exactly that configuration (``DEFAULT_ARCH_KWARGS``, ``DEFAULT_TRAIN``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medhe import atomic
from medhe.errors import ArtifactError, MedheError
from medhe.models import layers
from medhe.models.autoencoder import VQAutoencoder, build_latent_classifier
from medhe.models.metrics import compute_metrics

NIH = "nih_chestxray14_subset"
DEFAULT_ARCH_KWARGS = {"width": 8, "groups": 1, "se_reduction": 4, "head_size": 4}
DEFAULT_TRAIN = {"epochs": 60, "lr": 3e-3, "batch_size": 32, "weight_decay": 1e-3, "seed": 0, "flip": False,
                 "pos_weight": "full"}
PIXEL_PREPROCESS = {"channels": 1, "crop": "center", "mean": 0.5, "std": 0.5}
#: CKKS compile options of the shipped model: the engine's default for its depth (N=16384, 2^30 scale) left logit
#: errors up to 0.15 on cxr14-latent; N=32768 with a 2^36 scale brings them under 1e-2 (docs/latent.md).
DEFAULT_CKKS_OPTIONS = {"poly_degree": 32768, "scale_bits": 36}


# -- inputs ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(encoder: nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 (N, 256, 256) chest X-rays -> float32 continuous latents (N, c, 256/f, 256/f), as the client computes."""
    from medhe.models.train_autoencoder import PREPROCESS
    from medhe.data import Preprocess

    pre = Preprocess(**PREPROCESS)
    encoder.eval()
    out = [encoder(torch.from_numpy(pre.batch(images[i:i + batch_size]))).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


def pixel_inputs(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 chest X-rays -> float32 (N, 1, size, size), the pixel-space baseline's input."""
    from medhe.data import Preprocess

    return Preprocess(size=size, **PIXEL_PREPROCESS).batch(images)


def load_splits(data_dir: str | None = None) -> dict[str, Any]:
    """NIH subset train/val/test (patient-grouped split from ``medhe.data``)."""
    from medhe.data import load_dataset

    return {s: load_dataset(NIH, split=s, size=256, channels=1, data_dir=data_dir) for s in ("train", "val", "test")}


# -- metrics --------------------------------------------------------------------------------------------------------
def macro_auc(labels: np.ndarray, logits: np.ndarray) -> float | None:
    """Macro AUC over the labels that have both classes present (``compute_metrics``' convention)."""
    return compute_metrics("multi-label", labels, logits)["auc"]


def _rank_auc(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per-column ROC AUC by the Mann-Whitney rank formula (ties averaged); NaN where a column has one class."""
    from scipy.stats import rankdata

    ranks = rankdata(z, axis=0)
    pos = y.sum(0)
    neg = len(y) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def bootstrap_macro_auc(labels: np.ndarray, logits: np.ndarray, n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05) -> dict[str, Any]:
    """Macro AUC with a percentile bootstrap CI over images (small test sets make a point estimate misleading).

    Each resample averages the labels that have both classes in it, like ``compute_metrics``.
    """
    y = np.asarray(labels).astype(np.int64)
    z = np.asarray(logits, dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        auc = _rank_auc(y[idx], z[idx])
        if np.isfinite(auc).any():
            stats.append(float(np.nanmean(auc)))
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"auc": macro_auc(y, z), "ci_low": float(lo), "ci_high": float(hi), "ci": 1 - alpha, "n_boot": n_boot,
            "n": int(len(y))}


# -- classifier training ----------------------------------------------------------------------------------------------
def _logits(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                               for i in range(0, len(x), batch_size)]).astype(np.float64)


def train_classifier(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                     arch_kwargs: dict[str, Any] | None = None, epochs: int = 60, lr: float = 3e-3,
                     batch_size: int = 32, weight_decay: float = 1e-3, seed: int = 0, flip: bool = True,
                     pos_weight: str | None = "sqrt", log: Callable[[str], None] | None = None,
                     task: str = "multi-label", shift: int = 0) -> tuple[nn.Sequential, dict[str, Any]]:
    """Multi-label BCE (positives re-weighted by neg/pos, its sqrt, or not: ``pos_weight`` "full" | "sqrt" | None, so
    rare labels are not ignored at threshold 0.5), or cross-entropy over the classes for a single-label ``task``
    (labels (N, 1) class indices); keep the epoch with the best val AUC (single-label: ties broken by val ACC);
    re-record activation ranges on train+val in eval mode for the CKKS compiler. ``shift``: random translations of
    up to that many pixels (zero fill) per training input, on top of the optional horizontal ``flip``."""
    n, c, h, _ = x_train.shape
    single = task != "multi-label"
    num_outputs = int(max(y_train.max(), y_val.max())) + 1 if single else y_train.shape[1]
    kwargs = {"in_channels": c, "num_outputs": num_outputs, "image_size": h,
              **DEFAULT_ARCH_KWARGS, **(arch_kwargs or {})}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_latent_classifier(**kwargs)
    layers.set_recording(model, False)
    if single:
        loss_fn: nn.Module = nn.CrossEntropyLoss()
        yt = torch.from_numpy(np.asarray(y_train).reshape(-1).astype(np.int64))
    else:
        pos = y_train.sum(0).clip(min=1)
        ratio = (n - pos) / pos
        weights = {"full": ratio, "sqrt": np.sqrt(ratio), None: np.ones_like(ratio)}[pos_weight]
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weights, dtype=torch.float32))
        yt = torch.from_numpy(y_train.astype(np.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * int(np.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    xt = torch.from_numpy(x_train)
    best: tuple[tuple[float, float], int, Any] = ((-1.0, -1.0), 0, None)
    history = []
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(n)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            xb = xt[idx]
            if flip:
                mask = torch.from_numpy(rng.random(len(idx)) < 0.5)
                xb = torch.where(mask[:, None, None, None], xb.flip(-1), xb)
            if shift:
                xb = _random_shift(xb, shift, rng)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
        val = compute_metrics(task, y_val, _logits(model, x_val))
        val_auc = val["auc"] or 0.0
        score = (val_auc, val["acc"] if single else 0.0)
        history.append(round(val_auc, 4) if not single else [round(val_auc, 4), round(val["acc"], 4)])
        if score > best[0]:
            best = (score, epoch + 1, copy.deepcopy(model.state_dict()))
        if log and (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{epochs}: val AUC {val_auc:.4f}" + (f", ACC {val['acc']:.4f}" if single else ""))
    model.load_state_dict(best[2])
    layers.reset_ranges(model)
    layers.set_recording(model, True)
    _logits(model, np.concatenate([x_train, x_val]))
    model.eval()
    record = {"arch": "latent-hecnn", "arch_kwargs": kwargs, "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "weight_decay": weight_decay, "seed": seed, "flip": flip, "best_epoch": best[1],
              "best_val_auc": round(best[0][0], 4), "val_auc_history": history, "n_train": int(n),
              "loss": "CrossEntropy" if single else "BCEWithLogits", "pos_weight": None if single else pos_weight}
    if single:
        record.update(task=task, shift=shift, best_val_acc=round(best[0][1], 4))
    elif shift:
        record["shift"] = shift
    return model, record


def _random_shift(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Translate each input by up to ``k`` pixels per axis, filling with zeros (a small positional jitter)."""
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (k, k, k, k))
    dy, dx = rng.integers(0, 2 * k + 1, (2, len(x)))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])


# -- export ---------------------------------------------------------------------------------------------------------
def export_latent_model(out_dir: str | Path, ae: VQAutoencoder, model: nn.Sequential, record: dict[str, Any],
                        metrics: dict[str, Any], labels: list[str], name: str = "cxr14-latent",
                        command: str = "", extra: dict[str, Any] | None = None, image_size: int = 256,
                        ckks_options: dict[str, Any] | None = None, task: str = "multi-label",
                        dataset: dict[str, Any] | None = None) -> Path:
    """Save the latent model: classifier as the server network, the VQ encoder as the public client stage."""
    from medhe.models.artifact import save_artifact
    from medhe.models.modelcard import complete_card
    from medhe.models.train_autoencoder import PREPROCESS

    layers.check_he_friendly(model)
    card = {
        "name": name, "arch": "latent-hecnn", "arch_kwargs": record["arch_kwargs"], "task": task,
        "labels": list(labels), "dataset": dataset or {"name": NIH, "size": 256},
        "preprocessing": {**PREPROCESS, "size": image_size},
        "metrics": metrics, "activation_ranges": layers.activation_ranges(model),
        "training": {"command": command, **{k: v for k, v in record.items() if k not in ("arch", "arch_kwargs")}},
        "client_stage": {"arch": "vq-encoder", "arch_kwargs": ae.encoder_kwargs(),
                         "latent_shape": [ae.latent_channels, image_size // ae.factor, image_size // ae.factor]},
        "scheme_options": {"default_scheme": "ckks",
                           "ckks": dict(DEFAULT_CKKS_OPTIONS if ckks_options is None else ckks_options)},
        **(extra or {}),
    }
    return save_artifact(out_dir, model, complete_card(card), client_model=ae.encoder)


def export_pixel_model(out_dir: str | Path, model: nn.Sequential, record: dict[str, Any], metrics: dict[str, Any],
                       labels: list[str], size: int, name: str) -> Path:
    from medhe.models.artifact import save_artifact
    from medhe.models.modelcard import complete_card

    card = {"name": name, "arch": "latent-hecnn", "arch_kwargs": record["arch_kwargs"], "task": "multi-label",
            "labels": list(labels), "dataset": {"name": NIH, "size": 256},
            "preprocessing": {"size": size, **PIXEL_PREPROCESS}, "metrics": metrics,
            "activation_ranges": layers.activation_ranges(model),
            "training": {k: v for k, v in record.items() if k not in ("arch", "arch_kwargs")},
            "scheme_options": {"default_scheme": "ckks"}}
    return save_artifact(out_dir, model, complete_card(card))


# -- encrypted ------------------------------------------------------------------------------------------------------
def encrypted_eval(artifact: Any, x: np.ndarray, labels: np.ndarray, limit: int | None = None,
                   log: Callable[[str], None] | None = None, options: dict[str, Any] | None = None,
                   checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the server network under CKKS image by image: agreement with plaintext, logit error, latency, sizes.

    ``checkpoint`` receives the summary so far after every image (long runs on a shared machine get cut short).
    Raises ``PlanError`` (or another ``MedheError``) when the model does not compile for CKKS; the caller reports it.
    """
    from medhe.he import compile_model
    from medhe.he.evaluate import ImageRun, run_encrypted
    from medhe.progress import busy

    n = len(x) if limit is None else min(limit, len(x))
    t0 = time.perf_counter()
    with busy(f"compiling {getattr(artifact, 'name', 'the model')} for CKKS", log is not None):
        server = compile_model(artifact, scheme="ckks", **(options or {}))
    compile_s = time.perf_counter() - t0
    plain = _logits(artifact.model, x[:n])
    static = {"compile_s": compile_s, "params": _params(server.spec())}
    done: list[ImageRun] = []

    def on_image(run: ImageRun) -> None:
        done.append(run)
        if log:
            log(f"encrypted {run.index + 1}/{n}: server {run.eval_ms / 1e3:.2f} s wall, "
                f"{run.eval_cpu_ms / 1e3:.2f} s CPU")
        if checkpoint:
            checkpoint(_summary(done, plain[:run.index + 1], labels[:run.index + 1], static))

    def on_keys(info: dict[str, Any]) -> None:
        static["evaluation_key_bytes"] = info["evaluation_keys"]

    def stage(name: str) -> Any:  # the server eval of each image is logged above; key generation ticks here
        return busy(name, log is not None and name == "key generation")

    run_encrypted(server, x[:n], progress=False, on_image=on_image, on_keys=on_keys, stage=stage)
    return _summary(done, plain, labels[:n], static)


def _summary(runs: list[Any], plain: np.ndarray, labels: np.ndarray, static: dict[str, Any]) -> dict[str, Any]:
    """The report so far from the images' ``ImageRun`` records (times in the report are seconds)."""
    enc = np.stack([r.logits.reshape(-1) for r in runs])
    s = [r.eval_ms / 1e3 for r in runs]
    same = (enc > 0) == (plain > 0)
    result = {"n": len(enc), "agreement": float(np.mean(same)),
              "agreeing_decisions": int(same.sum()), "decisions": int(same.size),
              "max_abs_logit_error": float(np.abs(enc - plain).max()),
              "server_latency_s": {"median": statistics.median(s), "min": min(s), "max": max(s)},
              # CPU seconds of the server process: robust to other jobs on a shared machine, unlike wall time
              "server_cpu_s_median": statistics.median(r.eval_cpu_ms / 1e3 for r in runs),
              "client_encrypt_s_median": statistics.median(r.encrypt_ms / 1e3 for r in runs),
              "input_ciphertext_bytes": int(np.median([r.input_bytes for r in runs])),
              "output_ciphertext_bytes": int(np.median([r.output_bytes for r in runs])), **static,
              "logits": enc.tolist()}
    result["metrics"] = compute_metrics("multi-label", labels, enc) if len(enc) > 1 else None
    result["auc_bootstrap"] = bootstrap_macro_auc(labels, enc) if len(enc) > 1 else None
    return result


def _params(spec: dict[str, Any]) -> Any:
    """The CKKS parameters from a server spec (whatever keys the engine publishes under params / parameters)."""
    for key in ("params", "parameters", "ckks"):
        if key in spec:
            return spec[key]
    return {k: v for k, v in spec.items() if k in ("poly_modulus_degree", "coeff_modulus", "scale", "N")}


# -- the experiment -----------------------------------------------------------------------------------------------
def _find_autoencoder(factor: int, ae_root: Path) -> Path:
    from medhe.models.artifact import PRETRAINED_DIR

    for cand in (ae_root / f"vq-f{factor}", PRETRAINED_DIR / f"vq-f{factor}"):
        if (cand / "autoencoder.json").is_file():
            return cand
    raise ArtifactError(f"no f{factor} autoencoder under {ae_root} or the shipped models: "
                        f"train it with medhe train-autoencoder --factor {factor} --out {ae_root}/vq-f{factor}")


def run_latent_experiment(factors: tuple[int, ...] = (2, 4, 8, 16), ae_root: str | Path = "runs/latent",
                          out_dir: str | Path = "runs/latent/experiment", data_dir: str | None = None,
                          encrypted: bool | str = True, enc_limit: int | None = None, pixel_sizes: tuple[int, ...] = (64, 256),
                          pixel_epochs: dict[int, int] | None = None, use_shipped_f8: bool = False,
                          reuse: bool = False, f8_encrypted: str | Path | None = None,
                          ckks_options: dict[str, Any] | None = DEFAULT_CKKS_OPTIONS,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train/score every row and write ``latent_table.md``, ``latent_table.json`` and ``latent_plot.png``.

    ``enc_limit`` caps the encrypted test images per row (None: the whole test split); ``encrypted="plan"`` only
    compiles each row (parameters and operation counts, no keys), for machines without the time for full runs. By default every row,
    f8 included, trains on ``ae_root``'s autoencoders (trained to one common budget, so the rows compare factors, not
    training effort); with ``use_shipped_f8`` the f8 row scores the shipped ``cxr14-latent`` itself instead.
    ``reuse`` scores row models already exported under ``out_dir`` instead of retraining them (resuming a run).
    ``f8_encrypted``: a JSON report of ``encrypted_eval`` on the shipped model (e.g. the whole test split) used for
    the f8 row instead of running it again. ``ckks_options`` compile every row with the same CKKS parameters
    (default: the shipped model's), so the latency column compares like for like.
    """
    from medhe.models.artifact import PRETRAINED_DIR, load_artifact
    from medhe.models.train_autoencoder import load_autoencoder

    torch.set_num_threads(1)
    load_start = _machine()
    out = Path(out_dir)
    ae_root = Path(ae_root)
    splits = load_splits(data_dir)
    labels = splits["train"].label_names
    y = {s: splits[s].labels for s in splits}
    rows = []
    for f in factors:
        shipped_f8 = f == 8 and use_shipped_f8 and (PRETRAINED_DIR / "cxr14-latent" / "card.json").is_file()
        ae_dir = PRETRAINED_DIR / "vq-f8" if shipped_f8 else _find_autoencoder(f, ae_root)
        ae, ae_card = load_autoencoder(ae_dir)
        log(f"f{f}: encoding with {ae_dir}")
        x = {s: encode_images(ae.encoder, splits[s].images) for s in splits}
        shipped = load_artifact("cxr14-latent") if shipped_f8 else None
        if shipped is not None:
            model_dir, record = shipped.path, shipped.card["training"]
        elif reuse and (out / f"latent-f{f}" / "card.json").is_file():
            model_dir = out / f"latent-f{f}"
            record = load_artifact(model_dir).card["training"]
        else:
            model, record = train_classifier(x["train"], y["train"], x["val"], y["val"],
                                             arch_kwargs=row_arch_kwargs(x["train"].shape[1:]), **_train_args(),
                                             log=log)
            metrics = {s: compute_metrics("multi-label", y[s], _logits(model, x[s])) for s in ("val", "test")}
            model_dir = export_latent_model(out / f"latent-f{f}", ae, model, record, metrics, labels,
                                            name=f"latent-f{f}", command="run_latent_experiment")
        art = load_artifact(model_dir)
        row = {"row": f"f{f}", "factor": f, "input_shape": list(x["test"].shape[1:]),
               "input_values": int(np.prod(x["test"].shape[1:])), "model_dir": str(model_dir),
               "autoencoder_dir": str(ae_dir), "psnr": ae_card["metrics"].get("held_out", {}).get("psnr"),
               "ssim": ae_card["metrics"].get("held_out", {}).get("ssim"),
               "best_epoch": record.get("best_epoch"), "width": art.card["arch_kwargs"].get("width")}
        if f == 8 and f8_encrypted:
            import json

            row = _score(row, art, x["test"], y["test"], False, None, log)
            report = json.loads(Path(f8_encrypted).read_text())
            enc = np.asarray(report.pop("logits", None) or [], dtype=np.float64)
            if enc.size and "decisions" not in report:  # older reports: count the agreeing decisions again
                same = (enc > 0) == (_logits(art.model, x["test"][:len(enc)]) > 0)
                report.update(agreeing_decisions=int(same.sum()), decisions=int(same.size))
            row["encrypted"] = {**report, "source": str(f8_encrypted)}
            rows.append(row)
            continue
        rows.append(_score(row, art, x["test"], y["test"], encrypted, enc_limit, log,
                           with_output_bound(ckks_options, art.model, (x["train"], x["val"]))))
    for size in pixel_sizes:
        x = {s: pixel_inputs(splits[s].images, size) for s in splits}
        epochs = (pixel_epochs or {}).get(size, DEFAULT_TRAIN["epochs"])
        model_dir = out / f"pixel-{size}"
        if reuse and (model_dir / "card.json").is_file():
            record = load_artifact(model_dir).card["training"]
            record["arch_kwargs"] = load_artifact(model_dir).card["arch_kwargs"]
        else:
            log(f"pixel {size}x{size}: training {epochs} epochs")
            model, record = train_classifier(x["train"], y["train"], x["val"], y["val"],
                                             arch_kwargs=row_arch_kwargs(x["train"].shape[1:]),
                                             **{**_train_args(), "epochs": epochs}, log=log)
            metrics = {s: compute_metrics("multi-label", y[s], _logits(model, x[s])) for s in ("val", "test")}
            export_pixel_model(model_dir, model, record, metrics, labels, size, f"pixel-{size}")
        row = {"row": f"pixel {size}", "factor": None, "input_shape": list(x["test"].shape[1:]),
               "input_values": int(np.prod(x["test"].shape[1:])), "model_dir": str(model_dir), "psnr": None,
               "ssim": None, "best_epoch": record["best_epoch"],
               "width": record["arch_kwargs"]["width"]}
        pixel_art = load_artifact(model_dir)
        rows.append(_score(row, pixel_art, x["test"], y["test"], encrypted, enc_limit, log,
                           with_output_bound(ckks_options, pixel_art.model, (x["train"], x["val"]))))
    result = {"dataset": NIH, "split": "test", "n_test": int(len(y["test"])), "classifier": "latent-hecnn",
              "ckks_options": ckks_options, "enc_limit": enc_limit,
              "arch_kwargs": DEFAULT_ARCH_KWARGS, "train": DEFAULT_TRAIN, "rows": rows,
              "machine": {"cpus": load_start["cpus"], "load_start": load_start["load_average_1m"],
                          "load_end": _machine()["load_average_1m"]}}
    _ratios(result)
    write_table(result, out)
    return result


def _train_args() -> dict[str, Any]:
    return dict(DEFAULT_TRAIN)


#: slots of one ciphertext at the largest secure ring medhe's CKKS engine uses (N=32768). Tensors larger than this
#: span several ciphertexts (``he.ckks.compiler.blocks``), so every row keeps the same classifier width.
MAX_SLOTS = 16384


def row_arch_kwargs(input_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """The default classifier for every row (f2's 2x128x128 and 256x256 pixels included): the CKKS engine spreads
    tensors over as many ciphertexts as they need, so the rows compare factors with one classifier family."""
    return dict(DEFAULT_ARCH_KWARGS)


def logit_bound(model: nn.Module, inputs: tuple[np.ndarray, ...]) -> float:
    """2 x the largest |logit| on ``inputs`` (train + val, never test), rounded up to a power of two.

    The CKKS compiler sizes the output scale from a logit bound; its own estimate, propagated through the
    activation ranges, can be orders of magnitude loose (a trained cubic SE gate: 3e8 for covid-cxr-ckks), which
    leaves a small output scale and logit errors ~1. What the data show, with a 2x margin, is tight and safe.
    """
    return bound_for(max_abs_logit(model, inputs))


def max_abs_logit(model: nn.Module, inputs: tuple[np.ndarray, ...] | list[np.ndarray]) -> float:
    return max(float(np.abs(_logits(model, x)).max()) for x in inputs)


def bound_for(seen: float) -> float:
    """2 x ``seen``, rounded up to a power of two (``logit_bound``'s rule)."""
    return float(2 ** math.ceil(math.log2(max(2 * seen, 1.0))))


def with_output_bound(options: dict[str, Any] | None, model: nn.Module,
                      inputs: tuple[np.ndarray, ...]) -> dict[str, Any] | None:
    """``options`` plus ``output_bound`` from ``logit_bound`` unless the caller set one."""
    if options is None or "output_bound" in options:
        return options
    return {**options, "output_bound": logit_bound(model, inputs)}


def _score(row: dict[str, Any], art: Any, x: np.ndarray, y: np.ndarray, encrypted: bool, enc_limit: int | None,
           log: Callable[[str], None], ckks_options: dict[str, Any] | None = None) -> dict[str, Any]:
    plain = _logits(art.model, x)
    row["plain"] = {**compute_metrics("multi-label", y, plain), "auc_bootstrap": bootstrap_macro_auc(y, plain)}
    if encrypted:
        row["ckks_options"] = ckks_options
    try:
        if encrypted == "plan":
            row["encrypted"] = plan_stats(art, ckks_options)
        elif encrypted:
            enc = encrypted_eval_isolated(art, x, y, limit=enc_limit, verbose=log is not None, options=ckks_options)
            enc.pop("logits")
            # the encrypted AUC covers only the first n images: compare it with plain on those same images
            enc["plain_auc_same_images"] = macro_auc(y[:enc["n"]], plain[:enc["n"]]) if enc["n"] > 1 else None
            row["encrypted"] = enc
    except (MedheError, ImportError, AttributeError) as exc:  # engine absent, or the model does not fit
        row["encrypted"] = {"error": f"{type(exc).__name__}: {exc}"}
    log(f"{row['row']}: plain macro AUC {row['plain']['auc']:.4f}"
        + (f", encrypted {(row['encrypted'].get('metrics') or {}).get('auc')}" if encrypted else ""))
    return row


def _encrypted_eval_child(path: str, x: np.ndarray, y: np.ndarray, limit: int | None, verbose: bool,
                          options: dict[str, Any] | None) -> dict[str, Any]:
    import resource

    from medhe.models.artifact import load_artifact

    result = encrypted_eval(load_artifact(path), x, y, limit=limit, options=options,
                            log=(lambda m: print(m, flush=True)) if verbose else None)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # client and server
    return result


def encrypted_eval_isolated(art: Any, x: np.ndarray, y: np.ndarray, limit: int | None = None, verbose: bool = False,
                            options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``encrypted_eval`` in a fresh process: each row's peak memory is its own (reported as ``peak_rss_bytes``),
    and the keys and weights of the rows before it (~10 GB at N=32768) cannot pile up in one process."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_encrypted_eval_child, str(art.path), x, y, limit, verbose, options).result()
        except BrokenProcessPool:
            raise MedheError(f"the encrypted run of {art.path} was killed (out of memory?): run fewer rows at "
                             "once or on a machine with more memory") from None


def plan_stats(artifact: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile only (no keys, no ciphertexts): the CKKS parameters and operation counts a row would run with."""
    from medhe.he.ckks import compile_plan
    from medhe.he.ckks.server import input_shape_of

    t0 = time.perf_counter()
    plan = compile_plan(artifact.model, input_shape_of(artifact), artifact.card.get("activation_ranges"),
                        **(options or {}))
    summary = plan.summary()
    return {"plan": summary, "compile_s": time.perf_counter() - t0,
            "params": {k: summary[k] for k in ("poly_degree", "prime_bits", "scale_bits") if k in summary}}


def _ratios(result: dict[str, Any]) -> None:
    """Server latency of each row relative to the f8 row (the default)."""
    lat = {r["row"]: r.get("encrypted", {}).get("server_latency_s", {}).get("median") for r in result["rows"]}
    base = lat.get("f8")
    for r in result["rows"]:
        r["latency_vs_f8"] = (lat[r["row"]] / base) if base and lat[r["row"]] else None


# -- table and plot ---------------------------------------------------------------------------------------------
#: an encrypted macro AUC over fewer test images than this is not reported (14 labels, most with 0-2 positives).
MIN_AUC_N = 10


def _machine() -> dict[str, Any]:
    from medhe.machine import machine_info

    return machine_info()


def _machine_text(m: dict[str, Any] | None) -> str:
    if not m:
        return "this 2-core CPU"
    loads = ", ".join(f"{v:.1f}" for v in (m.get("load_start"), m.get("load_end")) if v is not None)
    return f"{m.get('cpus')}-core CPU shared with other jobs, load average {loads} (start, end)"


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _param_text(p: Any) -> str:
    if not isinstance(p, dict):
        return "—" if p is None else str(p)
    n = p.get("poly_degree") or p.get("poly_modulus_degree") or p.get("N")
    chain = p.get("prime_bits") or p.get("coeff_modulus_bits") or p.get("coeff_modulus")
    if isinstance(chain, (list, tuple)) and chain:
        chain = f"{sum(chain)} bits ({len(chain)} primes)"
    scale = p.get("scale_bits") or p.get("log_scale") or p.get("scale")
    parts = [f"N={n}" if n else "", f"Q={chain}" if chain else "", f"scale=2^{scale}" if scale else ""]
    text = " ".join(x for x in parts if x)
    return text or str(p)[:80]


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit


def write_table(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Markdown + JSON table and a PNG plot of macro AUC and server latency per row."""
    out = Path(out_dir)
    head = ("| row | input shape | width | PSNR dB | SSIM | plain macro AUC [95% CI] | encrypted macro AUC | agree | "
            "max abs logit err | server s median: wall (CPU) | vs f8 | input ct bytes | eval keys MB | peak RSS GB | "
            "CKKS params |")
    lines = ["# Latent-space encrypted chest X-ray classification (P1 table)", "",
             f"NIH ChestX-ray14 subset, test split (n={result['n_test']}), classifier `latent-hecnn` "
             f"{result['arch_kwargs']}; machine: {_machine_text(result.get('machine'))}. Encrypted columns: "
             + (f"the first {result['enc_limit']} test images per row" if result.get("enc_limit") else "all test images")
             + f" unless the row says otherwise (n); macro AUC only from n >= {MIN_AUC_N}. Peak RSS: the row's own process, "
             "client and server together.", "", head, "|" + "---|" * 15]
    for r in result["rows"]:
        b = r["plain"]["auc_bootstrap"]
        e = r.get("encrypted") or {}
        enc_auc = (e.get("metrics") or {}).get("auc")
        if e.get("metrics") and e["n"] >= MIN_AUC_N:
            enc_text = f"{_fmt(enc_auc)} (n={e['n']}"
            if e.get("plain_auc_same_images") is not None and e["n"] < result["n_test"]:
                enc_text += f"; plain on these {e['n']}: {_fmt(e['plain_auc_same_images'])}"
            enc_text += ")"
        elif e.get("n"):  # a handful of images: an AUC would be noise; the agreement column is the result
            enc_text = f"— (n={e['n']}, too few for AUC; see agree)"
        elif e.get("error"):
            enc_text = "does not fit: " + e["error"].removeprefix("PlanError: ")[:150].replace("|", "/")
        else:
            enc_text = "—"
        agree = _fmt(e.get("agreement"), ".4f")
        if e.get("decisions"):
            agree += f" ({e['agreeing_decisions']}/{e['decisions']})"
        shape = "x".join(map(str, r["input_shape"]))
        wall = e.get("server_latency_s", {}).get("median")
        cpu = e.get("server_cpu_s_median")
        params = _param_text(e.get("params")) if "params" in e else "—"
        if "plan" in e:
            pl = e["plan"]
            params += (f"; depth {pl.get('depth')}, {pl.get('input_ciphertexts')} input cts, "
                       f"{pl.get('rotations')} rot, {pl.get('plaintext_multiplications')} pt-mul")
            enc_text = enc_text if e.get("metrics") else "compiled, not run"
        lines.append(
            f"| {r['row']} | {shape} | {r.get('width', '—')} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'])} | "
            f"{_fmt(b['auc'])} [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}] | {enc_text} | "
            f"{agree} | {_fmt(e.get('max_abs_logit_error'), '.1e')} | "
            f"{_fmt(wall, '.2f')} ({_fmt(cpu, '.2f')}) | {_fmt(r.get('latency_vs_f8'), '.2f')} | "
            f"{e.get('input_ciphertext_bytes', '—')} | {_fmt(_scaled(e.get('evaluation_key_bytes'), 1e6), '.0f')} | "
            f"{_fmt(_scaled(e.get('peak_rss_bytes'), 1e9), '.1f')} | {params} |")
    paths = {"md": atomic.write_text(out / "latent_table.md", "\n".join(lines) + "\n"),
             "json": atomic.write_json(out / "latent_table.json", result)}
    paths["png"] = draw_plot(result, out / "latent_plot.png")
    return paths


def draw_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Two bar panels drawn with PIL (no plotting dependency): macro AUC (plain, encrypted) and server latency."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    rows = result["rows"]
    w, h, pad = 920, 420, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    panel_w = (w - 3 * pad) // 2
    base_y, top_y = h - pad, pad + 20
    group = panel_w / max(1, len(rows))

    def axis(x0: int, title: str, ymax: float, ticks: list[float], fmt: str) -> None:
        d.text((x0, 10), title, fill="black")
        d.line([(x0, top_y), (x0, base_y), (x0 + panel_w, base_y)], fill="black")
        for t in ticks:
            y = base_y - (t / ymax) * (base_y - top_y)
            d.line([(x0 - 4, y), (x0, y)], fill="black")
            d.text((x0 - 40, y - 6), format(t, fmt), fill="black")

    x0 = pad
    axis(x0, "test macro AUC (plain: blue, encrypted n>=10: orange; line = 0.5)", 1.0, [0, 0.25, 0.5, 0.75, 1.0], ".2f")
    y_half = base_y - 0.5 * (base_y - top_y)
    d.line([(x0, y_half), (x0 + panel_w, y_half)], fill=(180, 180, 180))
    for i, r in enumerate(rows):
        gx = x0 + i * group
        e = r.get("encrypted") or {}
        enc_auc = (e.get("metrics") or {}).get("auc") if e.get("n", 0) >= 10 else None  # AUC of a handful: noise
        vals = [(r["plain"]["auc"], (31, 119, 180)), (enc_auc, (255, 127, 14))]
        for j, (v, col) in enumerate(vals):
            if v is None:
                continue
            bx = gx + 8 + j * (group - 16) / 2
            d.rectangle([bx, base_y - v * (base_y - top_y), bx + (group - 16) / 2 - 2, base_y], fill=col)
        d.text((gx + 6, base_y + 6), r["row"], fill="black")
    x1 = 2 * pad + panel_w
    lat = [(r.get("encrypted") or {}).get("server_latency_s", {}).get("median") for r in rows]
    ymax = max([v for v in lat if v] or [1.0]) * 1.1
    axis(x1, "CKKS server latency per image, s (median)", ymax, [ymax * k / 4 for k in range(5)], ".2f")
    for i, (r, v) in enumerate(zip(rows, lat)):
        gx = x1 + i * group
        if v:
            d.rectangle([gx + 10, base_y - v / ymax * (base_y - top_y), gx + group - 10, base_y], fill=(44, 160, 44))
        else:
            d.text((gx + 10, base_y - 20), "n/a", fill="black")
        d.text((gx + 6, base_y + 6), r["row"], fill="black")
    buf = BytesIO()
    img.save(buf, format="PNG")
    return atomic.write_bytes(path, buf.getvalue())


# -- the shipped default --------------------------------------------------------------------------------------------
def train_default_model(ae_dir: str | Path = "vq-f8", out_dir: str | Path = "runs/latent/cxr14-latent",
                        data_dir: str | None = None, name: str = "cxr14-latent", command: str = "",
                        arch_kwargs: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                        log: Callable[[str], None] = print) -> Path:
    """Train ``cxr14-latent``: the default classifier configuration on the f8 encoder's latents, then export it
    with val/test metrics and the test macro AUC's bootstrap CI in the card."""
    from medhe.models.train_autoencoder import load_autoencoder

    torch.set_num_threads(1)
    ae, ae_card = load_autoencoder(ae_dir)
    splits = load_splits(data_dir)
    x = {s: encode_images(ae.encoder, splits[s].images) for s in splits}
    y = {s: splits[s].labels for s in splits}
    t0 = time.perf_counter()
    model, record = train_classifier(x["train"], y["train"], x["val"], y["val"], arch_kwargs=arch_kwargs,
                                     **{**_train_args(), **(train or {})}, log=log)
    record["elapsed_s"] = round(time.perf_counter() - t0, 1)
    record["autoencoder"] = {"dir": str(ae_dir), "factor": ae.factor, "metrics": ae_card.get("metrics")}
    metrics = {s: compute_metrics("multi-label", y[s], _logits(model, x[s])) for s in ("val", "test")}
    metrics["test"]["auc_bootstrap"] = bootstrap_macro_auc(y["test"], _logits(model, x["test"]))
    log(f"{name}: val {metrics['val']}, test {metrics['test']}")
    return export_latent_model(out_dir, ae, model, record, metrics, splits["train"].label_names, name=name,
                               command=command)
