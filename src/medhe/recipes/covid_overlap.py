#!/usr/bin/env python
"""Near-duplicate check between the COVID-19 Radiography subset and PneumoniaMNIST, before any joint use.

    medhe recipe covid-overlap [--out runs/overlap.json]

Why: PneumoniaMNIST (5,856 chest X-rays) is the only larger chest X-ray set available offline, so it is the
obvious corpus to pretrain the ``covid-cxr`` extractor on. But the COVID-19 Radiography Database took its first
1,341 Normal images from the same pediatric source (Kermany et al.) that PneumoniaMNIST is built from. If some
of the subset's images, test split included, are in PneumoniaMNIST, pretraining on it would show the model test
images, and any accuracy it gains could not be trusted.

Method: MedMNIST center-cropped each original to a square, while the database squeezed the whole (wider than
tall) original into a square. So every subset image is center-cropped to a few widths (60..100 %), downscaled to
28x28, and compared with every PneumoniaMNIST image (all three splits) by Pearson correlation of the pixels; the
best match over widths and images is reported. The COVID images, which cannot be in PneumoniaMNIST, give the
level that "best match by chance" reaches.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from medhe.atomic import write_json
from medhe.data import load_dataset, resolve_data_dir
from medhe.data.images import resize

DATASET = "covid19_radiography_subset"
CROP_WIDTHS = (1.0, 0.9, 0.8, 0.75, 0.7, 0.65, 0.6)  # fraction of the width kept, centred
KERMANY_NORMALS = 1341  # Normal-1 .. Normal-1341 of the database come from Kermany et al. (its first release)


def unit_rows(images: np.ndarray) -> np.ndarray:
    """Each image as a zero-mean unit vector, so a dot product is the Pearson correlation of the pixels."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norms == 0, 1.0, norms)


def _group(path: str) -> str:
    if path.startswith("COVID"):
        return "COVID (cannot be in PneumoniaMNIST)"
    number = int(path.rsplit("-", 1)[-1].split(".")[0])
    return "Normal, Kermany-sourced (1..1341)" if number <= KERMANY_NORMALS else "Normal, other sources"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medhe recipe covid-overlap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threshold", type=float, default=0.95,
                    help="correlation counted as a likely duplicate (the COVID images' maximum is about this)")
    ap.add_argument("--out", help="also write the per-image best matches as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    pneumonia = [load_dataset("pneumoniamnist", split=s, data_dir=args.data_dir) for s in ("train", "val", "test")]
    reference = unit_rows(np.concatenate([d.images for d in pneumonia]))
    source = np.concatenate([[d.split] * len(d) for d in pneumonia])
    folder = resolve_data_dir(args.data_dir) / DATASET
    rows = []
    for split in ("train", "val", "test"):
        ds = load_dataset(folder, split=split, channels=1)
        corr = np.full((len(ds), len(reference)), -1.0)
        for frac in CROP_WIDTHS:
            side = ds.images.shape[2]
            keep = max(1, round(side * frac))
            left = (side - keep) // 2
            small = np.stack([resize(np.ascontiguousarray(img[:, left:left + keep]), 28) for img in ds.images])
            np.maximum(corr, unit_rows(small) @ reference.T, out=corr)
        best = corr.argmax(axis=1)
        for i, path in enumerate(ds.paths):
            rows.append({"path": path, "split": split, "group": _group(path),
                         "best_corr": round(float(corr[i, best[i]]), 4), "pneumoniamnist_index": int(best[i]),
                         "pneumoniamnist_split": str(source[best[i]])})

    summary = {}
    for group in sorted({r["group"] for r in rows}):
        corr = np.array([r["best_corr"] for r in rows if r["group"] == group])
        likely = [r for r in rows if r["group"] == group and r["best_corr"] >= args.threshold]
        summary[group] = {"images": int(corr.size), "median_best_corr": round(float(np.median(corr)), 3),
                          "p90": round(float(np.quantile(corr, 0.9)), 3), "max": round(float(corr.max()), 3),
                          f">= {args.threshold}": len(likely),
                          "of_them_in_test_split": sum(r["split"] == "test" for r in likely)}
    print(json.dumps(summary, indent=1))
    top = sorted(rows, key=lambda r: -r["best_corr"])[:10]
    print("closest pairs:")
    for r in top:
        print(f"  {r['path']:28s} {r['split']:5s} corr {r['best_corr']:.3f}  "
              f"pneumoniamnist {r['pneumoniamnist_split']}[{r['pneumoniamnist_index']}]")
    if args.out:
        write_json(args.out, {"summary": summary, "threshold": args.threshold, "images": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
