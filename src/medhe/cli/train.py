"""``medhe train``: train an HE-friendly network on a MedMNIST flag or a labelled image folder into a model directory."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from medhe.textformat import table
from medhe.errors import MedheError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an HE-friendly model and write a model directory",
                       description="Train a zoo architecture; the model directory (weights + card.json) is ready for "
                                   "medhe evaluate / serve under every scheme.")
    p.add_argument("--dataset", required=True, help="MedMNIST flag (e.g. pneumoniamnist) or folder with labels.csv")
    p.add_argument("--arch", default="hecnn", help="architecture from the zoo (default: hecnn)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", help="model directory to write (default: models/<dataset>-<arch>)")
    p.add_argument("--force", action="store_true",
                   help="replace a trained model already in --out (it stays intact until the new one is written)")
    p.add_argument("--name", help="model name in the card (default: the --out folder name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    p.add_argument("--data-dir", help="folder with dataset files (default: $MEDHE_DATA or ~/.medhe/data)")
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, value as JSON (e.g. channels=16, hidden=[64,32]); repeatable")
    p.add_argument("--act", choices=("poly", "relu2"),
                   help="activation: poly = trainable a*x^2+b*x+c, relu2 = P3's fixed degree-2 ReLU approximation "
                        "(BatchNorm keeps its inputs in range); default: the architecture's own (relu2 for p3cnn)")
    p.add_argument("--quant-bits", type=int, help="train the fake-quantized FCNN for TFHE (--arch fcnn -> qfcnn)")
    p.add_argument("--no-augment", action="store_true", help="train without random affine / intensity jitter")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="select and ship an exponential moving average of the weights (e.g. 0.98)")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup regularisation strength (e.g. 0.2; default 0 = off)")
    p.add_argument("--class-balanced", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--calibrate", choices=("none", "youden", "acc"), default="none",
                   help="binary tasks: choose the decision threshold on the validation set (recorded in the card)")
    p.add_argument("--limit", type=int, help="use a seeded random subset of N images of each split (quick runs)")
    p.add_argument("--model-version", metavar="V",
                   help="the card's version (default 1); raise it whenever retrained weights replace a model of "
                        "the same name (docs/model-cards.md)")
    p.add_argument("--license", metavar="SPDX",
                   help="the weights' license in the card (default: unspecified; you own the weights you train)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def parse_arch_args(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (numbers, lists, true/false), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise MedheError(f"--arch-arg {item!r} is not KEY=VALUE (e.g. --arch-arg channels=16)")
        text = raw.strip()
        lowered = {"true": "true", "false": "false", "none": "null", "null": "null"}.get(text.lower(), text)
        try:
            out[key] = json.loads(lowered)
        except json.JSONDecodeError:
            out[key] = text
    return out


def resolve_arch(arch: str, quant_bits: int | None, arch_kwargs: dict[str, Any]) -> str:
    """``--quant-bits N`` turns the float FCNN into the fake-quantized one the TFHE backend compiles."""
    if quant_bits is None:
        return arch
    if quant_bits < 1 or quant_bits > 16:
        raise MedheError(f"--quant-bits must be between 1 and 16, not {quant_bits}")
    if arch not in ("fcnn", "qfcnn"):
        raise MedheError(f"--quant-bits applies to --arch fcnn (quantized for TFHE), not {arch!r}")
    arch_kwargs["quant_bits"] = quant_bits
    return "qfcnn"


def command_line(args: argparse.Namespace) -> str:
    """The full ``medhe train`` line with every option spelled out: rerunning it reproduces the model."""
    parts = ["medhe", "train", "--dataset", args.dataset, "--arch", args.arch, "--epochs", str(args.epochs),
             "--out", str(args.out), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), "--weight-decay", str(args.weight_decay), "--size", str(args.size)]
    if args.name:
        parts += ["--name", args.name]
    if args.label_smoothing:
        parts += ["--label-smoothing", str(args.label_smoothing)]
    if args.act is not None:
        parts += ["--act", args.act]
    for item in args.arch_arg:
        parts += ["--arch-arg", item]
    if args.quant_bits is not None:
        parts += ["--quant-bits", str(args.quant_bits)]
    if args.no_augment:
        parts.append("--no-augment")
    if args.ema is not None:
        parts += ["--ema", str(args.ema)]
    if args.mixup:
        parts += ["--mixup", str(args.mixup)]
    if args.class_balanced:
        parts.append("--class-balanced")
    if args.calibrate != "none":
        parts += ["--calibrate", args.calibrate]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from medhe.models.train import train_model

    arch_kwargs = parse_arch_args(args.arch_arg)
    if args.act is not None:
        if "act" in arch_kwargs and arch_kwargs["act"] != args.act:
            raise MedheError(f"--act {args.act} contradicts --arch-arg act={arch_kwargs['act']}: give one of them")
        arch_kwargs["act"] = args.act
    arch = resolve_arch(args.arch, args.quant_bits, arch_kwargs)
    if args.out is None:
        args.out = str(Path("models") / f"{Path(args.dataset).name}-{arch}")
    if args.threads is not None:
        if args.threads < 1:
            raise MedheError(f"--threads must be at least 1, not {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from medhe.cli._paths import input_dir

    args.data_dir = input_dir(args.data_dir, "--data-dir")
    artifact = train_model(
        args.dataset, arch=arch, epochs=args.epochs, out_dir=args.out, seed=args.seed, batch_size=args.batch_size,
        lr=args.lr, arch_kwargs=arch_kwargs, data_dir=args.data_dir, size=args.size, augment=not args.no_augment,
        command=command_line(args), progress=not args.no_progress, weight_decay=args.weight_decay,
        class_balanced=args.class_balanced, label_smoothing=args.label_smoothing, ema=args.ema, mixup=args.mixup,
        calibrate=None if args.calibrate == "none" else args.calibrate, name=args.name, limit=args.limit,
        card_extras={k: v for k, v in (("version", args.model_version), ("license", args.license)) if v},
        overwrite=args.force)
    print_summary(artifact)
    return 0


def label_list(labels: list[str]) -> str:
    """``2 labels: "malignant", "normal, benign"``: quoted, since MedMNIST names can contain commas."""
    return f"{len(labels)} label{'s' if len(labels) != 1 else ''}: " + ", ".join(f'"{name}"' for name in labels)


def print_summary(artifact: Any) -> None:
    card = artifact.card
    training = card.get("training", {})
    params = sum(p.numel() for p in artifact.model.parameters())
    print(f"\nmodel {card['name']!r} ({card['arch']}, {params:,} parameters) written to {artifact.path}")
    print(f"dataset {card['dataset'].get('name')} ({card['task']}, {label_list(card['labels'])}); "
          f"best epoch {training.get('best_epoch')} of {training.get('epochs')}, {training.get('elapsed_s')} s")
    data = card.get("training_data") or {}
    print(f"card v{card.get('version')}, license {card.get('license')}, code {str(card.get('code_revision'))[:12]}; "
          f"training data {data.get('dataset')} ({data.get('n')} images, sha256 {str(data.get('sha256'))[:16]}...)")
    if training.get("calibration"):
        cal = training["calibration"]
        print(f"decision threshold chosen by {cal['method']}: logit margin {cal['logit_margin_threshold']}")
    rows = [[split, m.get("acc"), m.get("auc"), m.get("f1")] for split, m in card.get("metrics", {}).items()]
    print(table(["split", "ACC", "AUC", "F1"], rows))
