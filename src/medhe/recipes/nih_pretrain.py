#!/usr/bin/env python
"""Pretrain the ``covid-cxr`` extractor on the NIH ChestX-ray14 subset (14 findings), minus the images it shares.

    medhe recipe nih-pretrain --out runs/nih-pretrain     # ~3 min, 2 threads
    medhe recipe covid-cv --fold 0 --epochs 60 --init-extractor runs/nih-pretrain/extractor.safetensors ...

Why: the shipped extractor learns from 688 images with no pretraining (no weights can be fetched here, and
PneumoniaMNIST shares test images with the subset: ``medhe recipe covid-overlap``). The NIH subset is
adult and labelled with the opacities COVID-19 shows; the COVID database's RSNA Normals come from NIH, so every NIH
image that correlates >= 0.98 with any subset image (64x64, all splits) is dropped before training. The extractor is
the shipped one (128 px, width 0.5, 32 features) with a linear head to the 14 findings (binary cross-entropy, the
shipped augmentation and schedule, last epoch kept); only the extractor is kept. Protocol: docs/paillier.md, round 4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from medhe.atomic import write_bytes, write_json
from medhe.data import Preprocess, load_dataset, resolve_data_dir
from medhe.data.images import resize
from medhe.models.train_extractor import train_split_model
from medhe.recipes.covid import AUGMENTS, DATASET
from medhe.recipes.covid_cv import LR, extractor_kwargs  # the shipped extractor's shape and rate
from medhe.recipes.covid_overlap import unit_rows

NIH = "nih_chestxray14_subset"


def _small(images: np.ndarray, side: int = 64) -> np.ndarray:
    return np.stack([resize(img, side) for img in images])


def shared_images(nih, covid, threshold: float) -> list[tuple[int, float, str]]:
    """NIH images that are (resized) copies of a COVID-subset image: (NIH index, correlation, subset path)."""
    corr = unit_rows(_small(nih.images)) @ unit_rows(_small(covid.images)).T
    best, match = corr.max(axis=1), corr.argmax(axis=1)
    return [(int(i), float(best[i]), covid.paths[match[i]]) for i in np.flatnonzero(best >= threshold)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medhe recipe nih-pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/nih-pretrain")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.98, help="correlation above which an NIH image is "
                    "taken to be a copy of a COVID-subset image (copies score >= 0.998, others <= 0.94)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = resolve_data_dir(args.data_dir)
    nih = load_dataset(root / NIH, split="all", channels=1)
    covid = load_dataset(root / DATASET, split="all", channels=1)
    shared = shared_images(nih, covid, args.threshold)
    for i, c, path in shared:
        print(f"dropped {nih.paths[i]}: correlation {c:.4f} with {path}")
    keep = np.setdiff1d(np.arange(len(nih)), [i for i, _, _ in shared])
    size, width = 128, 0.5
    pre = Preprocess(channels=1, size=size, crop=None, mean=0.5, std=0.5)
    x, y = pre.batch(nih.images[keep]), nih.labels[keep]
    print(f"pretraining on {len(keep)} of {len(nih)} NIH images, {y.shape[1]} findings", flush=True)
    result = train_split_model(x, y, x[:0], y[:0], extractor_kwargs=extractor_kwargs(size, width),
                               num_outputs=y.shape[1], epochs=args.epochs, lr=LR, seed=args.seed,
                               augment=AUGMENTS["default"], select="last", multi_label=True,
                               log=lambda m: print(m, flush=True))
    out = Path(args.out)
    state = {k: v.contiguous() for k, v in result.extractor.state_dict().items()}
    write_bytes(out / "extractor.safetensors", save(state))
    write_json(out / "pretrain.json", {
        "command": "medhe recipe nih-pretrain " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "images": int(len(keep)),
        "dropped_as_shared_with_covid_subset": [{"nih": nih.paths[i], "correlation": round(c, 4), "covid": p}
                                               for i, c, p in shared],
        "labels": nih.label_names, "extractor": extractor_kwargs(size, width), "epochs": args.epochs,
        "seed": args.seed, "lr": LR, "seconds": round(result.seconds, 1), "history": result.history})
    print(json.dumps({"out": str(out), "seconds": round(result.seconds, 1),
                      "final_train_loss": result.history[-1]["train_loss"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
