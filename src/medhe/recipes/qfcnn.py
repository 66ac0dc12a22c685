"""Quantization-aware training of a TFHE-ready FCNN (``qfcnn``) on a MedMNIST dataset, saved as a medhe artifact.

Why a script of its own: the shipped TFHE models must be reproducible from one recorded command; it uses the same
pieces as ``medhe train`` (medhe.data, the zoo's ``qfcnn``, ``save_artifact``) and records its exact command line.
The checkpoint is chosen on validation accuracy of the quantized network; the test split is only reported.

    medhe recipe qfcnn --dataset pneumoniamnist --out src/medhe/pretrained/pneumoniamnist-qfcnn
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time

import numpy as np
import torch
from torch import nn

from medhe.data import Preprocess, load_dataset
from medhe.models.artifact import save_artifact
from medhe.models.modelcard import complete_card
from medhe.models.metrics import compute_metrics
from medhe.models.zoo import build_model


def metrics(model: nn.Module, x: torch.Tensor, y: np.ndarray, task: str) -> dict[str, float | None]:
    model.eval()
    with torch.no_grad():
        logits = model(x).double().numpy()
    return compute_metrics(task, y, logits)


def shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (edge padding): cheap augmentation against overfitting."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return pad[:, :, dy:dy + h, dx:dx + w]


def jitter(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """Per-image random contrast and brightness: scans from other sources differ in exposure."""
    if amount <= 0:
        return x
    n = x.shape[0]
    c = 1 + amount * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    b = amount * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    return torch.clamp(x * c + b, -1.0, 1.0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medhe recipe qfcnn", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--hidden", type=int, nargs="+", default=[16])
    ap.add_argument("--quant-bits", type=int, nargs="+", default=[3])
    ap.add_argument("--act-bits", type=int, nargs="+", default=[3])
    ap.add_argument("--acc-bits", type=int, nargs="+", default=[5])
    ap.add_argument("--input-bits", type=int, default=3)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shift", type=int, default=2)
    ap.add_argument("--jitter", type=float, default=0.0, help="random contrast/brightness amount")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--l1", type=float, default=1.0,
                    help="penalty on hidden layers' worst-case accumulator range (sparser weights keep more precision)")
    ap.add_argument("--acc-noise", type=float, default=0.0,
                    help="training noise (accumulator units) before rounding, for approximate rounding")
    ap.add_argument("--balanced", action="store_true", help="class-balanced cross-entropy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    pre = Preprocess(channels=1, size=28, crop=None, mean=0.5, std=0.5)
    splits = {s: load_dataset(args.dataset, split=s, size=28) for s in ("train", "val", "test")}
    xs = {s: torch.from_numpy(pre.batch(d.images)) for s, d in splits.items()}
    ys = {s: d.labels[:, 0].astype(np.int64) for s, d in splits.items()}
    n_classes = len(splits["train"].label_names)
    task = splits["train"].task
    arch_kwargs = {"in_channels": 1, "num_outputs": n_classes, "image_size": 28, "hidden": args.hidden,
                   "quant_bits": args.quant_bits if len(args.quant_bits) > 1 else args.quant_bits[0],
                   "act_bits": args.act_bits if len(args.act_bits) > 1 else args.act_bits[0],
                   "acc_bits": args.acc_bits if len(args.acc_bits) > 1 else args.acc_bits[0],
                   "input_bits": args.input_bits, "pool": args.pool, "range_penalty": args.l1}
    model = build_model("qfcnn", **arch_kwargs)
    model.train_acc_noise = args.acc_noise
    counts = np.bincount(ys["train"], minlength=n_classes)
    weight = torch.tensor(len(ys["train"]) / (n_classes * counts), dtype=torch.float32) if args.balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * ((len(ys["train"]) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    ytr = torch.from_numpy(ys["train"])
    best, best_state, best_epoch = -1.0, None, -1
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb = jitter(shift(xs["train"][idx], args.shift, gen), args.jitter, gen)
            loss = loss_fn(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = metrics(model, xs["val"], ys["val"], task)
        if val["acc"] >= best:
            best, best_state, best_epoch = val["acc"], copy.deepcopy(model.state_dict()), epoch
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} val acc {val['acc']:.4f} auc {val['auc']:.4f}",
              flush=True)
    model.load_state_dict(best_state)
    model.eval()
    result = {s: metrics(model, xs[s], ys[s], task) for s in ("val", "test")}
    model.quantized = False
    result_float = {s: metrics(model, xs[s], ys[s], task) for s in ("val", "test")}
    model.quantized = True
    integer = model.export_integer()
    q_test = integer.predict_logits(xs["test"].numpy()).argmax(1)
    print(json.dumps({"best_epoch": best_epoch + 1, "quantized": result, "float": result_float,
                      "integer_test_acc": float((q_test == ys["test"]).mean())}), flush=True)
    command = "medhe recipe qfcnn " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    card = {
        "name": args.name or f"{args.dataset}-qfcnn",
        "arch": "qfcnn",
        "arch_kwargs": arch_kwargs,
        "task": splits["train"].task,
        "labels": list(splits["train"].label_names),
        "dataset": {"name": args.dataset, "size": 28},
        "preprocessing": pre.to_dict(),
        "metrics": {**result, "float_unquantized": result_float},
        "activation_ranges": {},
        "training": {"command": command, "seed": args.seed, "epochs": args.epochs, "best_epoch": best_epoch + 1,
                     "selection": "best quantized validation accuracy", "lr": args.lr,
                     "batch_size": args.batch_size, "balanced_loss": args.balanced, "shift_augment": args.shift,
                     "jitter_augment": args.jitter, "range_penalty": args.l1, "acc_noise": args.acc_noise, "weight_decay": args.weight_decay,
                     "minutes": round((time.time() - t0) / 60, 2)},
        "quantization": model.quantization_card(),
        "scheme_options": {"default_scheme": "tfhe"},
    }
    save_artifact(args.out, model, complete_card(card))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
