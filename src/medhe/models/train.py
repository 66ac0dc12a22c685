"""Training any zoo architecture on a MedMNIST flag or a labelled image folder, ending in a model artifact.

The artifact's card records what the encrypted backends and the client need to reproduce the plaintext model:
the preprocessing, the activation input ranges observed on the training set (CKKS parameter choice, TFHE
quantization), the val/test metrics and the exact command. Model selection and the optional decision-threshold
choice use the validation split only; the test split is scored once, at the end, for the card.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medhe.errors import DataError, MedheError
from medhe.models import layers
from medhe.models.artifact import ModelArtifact, check_model_target, load_artifact, save_artifact
from medhe.models.augment import Augment
from medhe.models.metrics import compute_metrics
from medhe.models.modelcard import complete_card, loaded_entry
from medhe.models.predict import predict_logits
from medhe.models.zoo import build_model

CALIBRATIONS = (None, "youden", "acc")


def train_model(dataset: str | os.PathLike, arch: str = "hecnn", epochs: int = 30,
                out_dir: str | os.PathLike | None = None, seed: int = 0, batch_size: int = 128, lr: float = 3e-3,
                arch_kwargs: dict[str, Any] | None = None, data_dir: str | os.PathLike | None = None,
                size: int = 28, augment: bool | Augment = True, command: str | None = None, progress: bool = True,
                *, weight_decay: float = 1e-4, class_balanced: bool = False, label_smoothing: float = 0.0,
                calibrate: str | None = None, name: str | None = None, limit: int | None = None,
                grad_clip: float = 5.0, ema: float | None = None, mixup: float = 0.0,
                card_extras: dict[str, Any] | None = None, overwrite: bool = True) -> ModelArtifact:
    """Train ``arch`` on ``dataset`` and write the artifact to ``out_dir``; returns it reloaded from disk.

    ``calibrate``: for binary tasks, move the decision threshold (the last layer's bias) to the point on the
    validation set that maximises balanced accuracy (``"youden"``, robust to a class-prior shift) or accuracy
    (``"acc"``). ``ema``: keep an exponential moving average of the weights with this decay (e.g. 0.99) and
    select/ship the averaged model, which is steadier on small datasets. ``limit`` keeps N images of every split
    (a seeded random subset; quick runs and tests). ``card_extras`` is merged into the card (e.g. a backend's
    quantization section). ``mixup``: Beta(alpha, alpha) mixup strength (0 = off), a regulariser for small sets.
    ``overwrite=False`` refuses, before training, to replace a trained model in ``out_dir`` (``medhe train``
    without ``--force``); either way the folder is replaced as a whole only once the new model is complete.
    """
    _check_args(epochs, batch_size, lr, size, calibrate, limit, mixup)
    if out_dir is None:
        raise MedheError("no output folder given: pass --out DIR")
    check_model_target(out_dir, overwrite)  # before the minutes of training, not after
    started = time.perf_counter()
    data = _load_splits(dataset, size, data_dir, limit, (arch_kwargs or {}).get("in_channels"), seed)
    if calibrate and data.train.task != "binary-class":
        raise MedheError(f"threshold calibration applies to binary tasks only, and {dataset} is {data.train.task}: "
                         "drop --calibrate")
    kwargs = {"in_channels": data.preprocess.channels, "num_outputs": data.train.num_outputs,
              "image_size": size, **(arch_kwargs or {})}
    torch.manual_seed(seed)
    model = build_model(arch, **kwargs)
    layers.set_recording(model, False)
    _check_outputs(model, arch, kwargs)
    loss_fn = _loss(data.train.task, data.train.labels, data.train.num_outputs, class_balanced, label_smoothing)
    aug = augment if isinstance(augment, Augment) else (Augment() if augment else Augment.off())
    history = _fit(model, data, loss_fn, aug, epochs, batch_size, lr, weight_decay, grad_clip, seed, progress, ema,
                   mixup)
    calibration = None
    if calibrate:
        calibration = calibrate_threshold(model, data.x_val, data.val.labels, calibrate)
    metrics = {
        "val": compute_metrics(data.val.task, data.val.labels, predict_logits(model, data.x_val)),
        "test": compute_metrics(data.test.task, data.test.labels, predict_logits(model, data.x_test)),
    }
    record_ranges(model, data.x_train)  # last forward pass: ranges come from the training set only
    training = {
        "command": command or equivalent_command(
            dataset, arch, out_dir, arch_kwargs, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, size=size, label_smoothing=label_smoothing, ema=ema, mixup=mixup or None,
            calibrate=calibrate,
            name=name, limit=limit, class_balanced=class_balanced, no_augment=not aug.enabled),
        "seed": seed, "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
        "augment": aug.to_dict() if aug.enabled else False, "class_balanced": class_balanced,
        "label_smoothing": label_smoothing, "ema": ema, "mixup": mixup, "best_epoch": history["best_epoch"],
        "n_train": len(data.train), "n_val": len(data.val), "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if calibration:
        training["calibration"] = calibration
    card = {
        "name": name or Path(out_dir).name,
        "arch": arch,
        "arch_kwargs": kwargs,
        "task": data.train.task,
        "labels": list(data.train.label_names),
        "dataset": data.card_entry,
        "preprocessing": data.preprocess.to_dict(),
        "metrics": metrics,
        "activation_ranges": layers.activation_ranges(model),
        "training": training,
        **(card_extras or {}),
    }
    if hasattr(model, "quantization_card"):  # QAT models: the TFHE compiler reads the integer program from here
        card["quantization"] = model.quantization_card()
        card.setdefault("scheme_options", {"default_scheme": "tfhe"})
    sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    note = f"--limit {limit}: a seeded subset of every split" if limit is not None else None
    card = complete_card(card, training_data=loaded_entry(data.card_entry["name"], data.train, sizes,
                                                          data.card_entry.get("size"), note))
    save_artifact(out_dir, model, card, overwrite=overwrite, command="medhe train")
    return load_artifact(out_dir)


def _check_args(epochs: int, batch_size: int, lr: float, size: int, calibrate: str | None,
                limit: int | None, mixup: float) -> None:
    if epochs < 1:
        raise MedheError(f"epochs must be at least 1, not {epochs}")
    if batch_size < 2:
        raise MedheError(f"batch size must be at least 2 (BatchNorm needs it), not {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise MedheError(f"learning rate must be a positive number, not {lr}")
    if size < 8:
        raise MedheError(f"image size must be at least 8 pixels, not {size}")
    if calibrate not in CALIBRATIONS:
        raise MedheError(f"calibration {calibrate!r} is unknown: use none, youden or acc")
    if mixup < 0:
        raise MedheError(f"mixup strength must be >= 0 (0 turns it off), not {mixup}")
    if limit is not None and limit < 4:
        raise MedheError(f"limit must be at least 4 images, not {limit}")


class _Splits:
    """The three splits, preprocessed once, plus what the card says about the dataset."""

    def __init__(self, train, val, test, preprocess, card_entry: dict[str, Any]) -> None:
        self.train, self.val, self.test = train, val, test
        self.preprocess = preprocess
        self.card_entry = card_entry
        self.x_train = preprocess.batch(train.images)
        self.x_val = preprocess.batch(val.images)
        self.x_test = preprocess.batch(test.images)


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The images a ``limit`` keeps: a seeded random subset in the original order (folders are sorted by class,
    so the first N images would often hold one class only)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _load_splits(dataset: str | os.PathLike, size: int, data_dir: Any, limit: int | None,
                 in_channels: int | None, seed: int) -> _Splits:
    from medhe.data import Preprocess, dataset_info, load_dataset, resolve_data_dir

    info = dataset_info(dataset, data_dir=data_dir)
    splits = []
    for split in ("train", "val", "test"):
        ds = load_dataset(dataset, split=split, size=size, data_dir=data_dir)
        if limit is not None:
            keep = subset_indices(len(ds), limit, seed)
            ds.images, ds.labels = ds.images[keep], ds.labels[keep]
            ds.paths = None if ds.paths is None else [ds.paths[i] for i in keep]  # the card's fingerprint lists them
        if len(ds) == 0:
            raise DataError(f"dataset {dataset} has no {split} images: add images or use a larger dataset")
        splits.append(ds)
    train = splits[0]
    if train.task != "multi-label" and len(np.unique(train.labels)) < 2:
        raise DataError(f"the {dataset} training split holds a single class: training needs at least two")
    if info.get("kind") == "medmnist":
        entry: dict[str, Any] = {"name": info["name"], "size": size}
    else:
        folder = Path(info["path"]).resolve()
        root = resolve_data_dir(data_dir).resolve()
        portable = folder.parent == root  # a folder inside the data folder is found again by name
        entry = {"name": folder.name if portable else str(folder), "path": str(folder), "size": size}
    channels = int(in_channels) if in_channels else train.n_channels
    if channels not in (1, 3):
        raise MedheError(f"in_channels must be 1 or 3 (grayscale or RGB), not {channels}")
    preprocess = Preprocess(channels=channels, size=size, crop=None, mean=0.5, std=0.5)
    return _Splits(*splits, preprocess, entry)


def _check_outputs(model: nn.Module, arch: str, kwargs: dict[str, Any]) -> None:
    """One logit per class/label, or the loss and metrics would silently score the wrong thing."""
    probe = torch.zeros(2, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    model.eval()
    with torch.no_grad():
        out = model(probe)
    model.train()
    if out.dim() != 2 or out.shape[1] != kwargs["num_outputs"]:
        raise MedheError(f"architecture {arch!r} gives outputs of shape {tuple(out.shape[1:])}, not one logit per "
                         f"class ({kwargs['num_outputs']}): it is not a classifier (train feature extractors with "
                         "their own command) or its arch arguments are wrong")


def _loss(task: str, labels: np.ndarray, num_outputs: int, balanced: bool, smoothing: float) -> nn.Module:
    """CE for single-label tasks (ordinal as classes, like MedMNIST), BCE-with-logits for multi-label."""
    if task == "multi-label":
        pos_weight = None
        if balanced:
            pos = labels.sum(axis=0).astype(np.float64)
            pos_weight = torch.tensor(np.clip((len(labels) - pos) / np.maximum(pos, 1), 0.1, 50), dtype=torch.float32)
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    weight = None
    if balanced:
        counts = np.bincount(labels.reshape(-1), minlength=num_outputs).astype(np.float64)
        weight = torch.tensor(len(labels) / (num_outputs * np.maximum(counts, 1)), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)


def _targets(task: str, labels: np.ndarray) -> torch.Tensor:
    if task == "multi-label":
        return torch.from_numpy(labels.astype(np.float32))
    return torch.from_numpy(labels.reshape(-1).astype(np.int64))


def _selection_key(metrics: dict[str, Any]) -> tuple[float, float]:
    auc = metrics.get("auc")
    return (-1.0 if auc is None else auc, metrics["acc"])


def _fit(model: nn.Module, data: _Splits, loss_fn: nn.Module, aug: Augment, epochs: int, batch_size: int, lr: float,
         weight_decay: float, grad_clip: float, seed: int, progress: bool, ema: float | None,
         mixup: float) -> dict[str, Any]:
    """AdamW with one warm-up epoch then cosine decay; keeps the weights of the best validation epoch."""
    if ema is not None and not 0 < ema < 1:
        raise MedheError(f"ema decay must be between 0 and 1 (e.g. 0.99), not {ema}")
    averaged = copy.deepcopy(model) if ema else None
    gen = torch.Generator().manual_seed(seed)
    mix_rng = np.random.default_rng(seed)
    x = torch.from_numpy(data.x_train)
    y = _targets(data.train.task, data.train.labels)
    n = len(x)
    steps_per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    total = epochs * steps_per_epoch
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # no decay on biases, BN and activation coefficients
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = min(steps_per_epoch, max(1, total // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    best_key, best_state, best_epoch = None, None, 0
    bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress, file=sys.stderr)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        running, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size] if n >= batch_size else order
            xb, yb = aug(x[idx], gen), y[idx]
            if mixup:
                loss = _mixup_loss(model, loss_fn, xb, yb, mixup, mix_rng, gen)
            else:
                loss = loss_fn(model(xb), yb)
            if not torch.isfinite(loss):
                raise MedheError(f"training diverged at epoch {epoch} (loss {float(loss)}): lower --lr "
                                 "or use BatchNorm before every activation")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            if averaged is not None:
                ema_update(averaged, model, ema)
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
        scored = averaged if averaged is not None else model
        val = compute_metrics(data.val.task, data.val.labels, predict_logits(scored, data.x_val))
        key = _selection_key(val)
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch
            best_state = copy.deepcopy(scored.state_dict())
        bar.set_postfix(loss=f"{running / max(seen, 1):.4f}", val_auc=_fmt(val["auc"]), val_acc=f"{val['acc']:.4f}",
                        best=best_epoch)
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return {"best_epoch": best_epoch, "best_val": best_key}


def _mixup_loss(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float,
                rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Mixup (Zhang et al. 2018): train on convex combinations of image pairs and of their losses."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=gen)
    out = model(lam * x + (1 - lam) * x[perm])
    return lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y[perm])


def ema_update(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model, for parameters and BN statistics alike."""
    with torch.no_grad():
        for (name, avg), cur in zip(averaged.state_dict().items(), model.state_dict().values()):
            if avg.dtype.is_floating_point and "input_m" not in name:  # not the activation range buffers
                avg.mul_(decay).add_(cur, alpha=1 - decay)
            else:
                avg.copy_(cur)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def last_linear(model: nn.Module) -> nn.Module:
    """The layer producing the logits (the last Linear/Conv2d in module order)."""
    found = None
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            found = mod
    if found is None or found.bias is None:
        raise MedheError("cannot calibrate the decision threshold: the model's last layer has no bias")
    return found


def calibrate_threshold(model: nn.Module, x_val: np.ndarray, val_labels: np.ndarray, method: str) -> dict[str, Any]:
    """Move a binary model's decision threshold to the best point on the validation set by shifting its last bias.

    The margin m = logit1 - logit0 is compared with a threshold t; subtracting t/2 from bias 1 and adding t/2 to
    bias 0 makes argmax (and softmax > 0.5) decide exactly ``m > t``. AUC is unchanged (a monotone shift).
    """
    logits = predict_logits(model, x_val)
    if logits.shape[1] != 2:
        raise MedheError("threshold calibration needs a binary model with two logits")
    margin = logits[:, 1] - logits[:, 0]
    y = np.asarray(val_labels).reshape(-1)
    values = np.unique(margin)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    pos, neg = max(1, int((y == 1).sum())), max(1, int((y == 0).sum()))

    def score(t: float) -> float:
        pred = margin > t
        tpr, tnr = float((pred & (y == 1)).sum()) / pos, float((~pred & (y == 0)).sum()) / neg
        return (tpr + tnr) / 2 if method == "youden" else float((pred == (y == 1)).mean())

    scores = np.array([score(t) for t in candidates])
    best = scores.max()
    # among ties, the threshold closest to the untouched model (t = 0)
    t = float(min(candidates[scores >= best - 1e-12], key=abs))
    layer = last_linear(model)
    with torch.no_grad():
        layer.bias[1] -= t / 2
        layer.bias[0] += t / 2
    return {"method": f"{method} on val", "logit_margin_threshold": round(t, 6),
            "val_" + ("balanced_acc" if method == "youden" else "acc"): round(float(best), 6)}


def record_ranges(model: nn.Module, x_train: np.ndarray) -> None:
    """Reset and re-record every activation's input range over the training set, in eval mode (final weights)."""
    layers.reset_ranges(model)
    predict_logits(model, x_train, record=True)


def equivalent_command(dataset: Any, arch: str, out_dir: Any, arch_kwargs: dict[str, Any] | None,
                       **options: Any) -> str:
    """The ``medhe train`` line that reproduces a call made from Python (recorded when no CLI line is given).

    Options that are None or False are left out; True becomes a bare flag. A custom ``Augment`` has no CLI
    spelling: the card's ``training.augment`` records its strengths.
    """
    parts = ["medhe", "train", "--dataset", str(dataset), "--arch", arch, "--out", str(out_dir)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    for key, value in (arch_kwargs or {}).items():
        parts += ["--arch-arg", f"{key}={json.dumps(value)}"]
    return shlex.join(parts)
