#!/usr/bin/env python
"""Train and export the shipped ``covid-cxr`` model (public MobileNetV2-style extractor + private linear head).

    medhe recipe covid [--out src/medhe/pretrained/covid-cxr]

Data: the COVID-19 Radiography subset (COVID vs Normal) with medhe's deterministic stratified split (seed 0,
70/15/15). Images are resized to 128 px grayscale (the card records the exact ``Preprocess``). The epoch is
chosen on the validation split; test metrics are computed once, at the end, for the card.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medhe.data import Preprocess, load_dataset, resolve_data_dir
from medhe.models.artifact import PRETRAINED_DIR, save_artifact
from medhe.models.modelcard import complete_card
from medhe.models.augment import Augment
from medhe.models.mobilenet import FEATURE_BOUND
from medhe.models.train_extractor import predict_logits, train_split_model

DATASET = "covid19_radiography_subset"
#: how medhe.data.folder splits each COVID folder (the large one has a group column: near-twins stay together)
SPLIT_TEXT = {DATASET: "medhe deterministic stratified 70/15/15, seed 0",
              "covid19_radiography_large": "medhe deterministic 70/15/15, seed 0, grouped by group_id (dataset.json)"}
AUGMENTS = {"default": Augment(), "light": Augment(rotate_deg=5, translate=0.05, scale=0.05, brightness=0.05,
                                                   contrast=0.1),
            "flip": Augment(hflip=True)}
#: Test-time views (client-side TTA: each member's features are averaged over these fixed transforms).
VIEWS = {"id": {}, "flip": {"flip": True}, "dx+": {"dx": 0.04}, "dx-": {"dx": -0.04}, "dy+": {"dy": 0.04},
         "dy-": {"dy": -0.04}, "zin": {"scale": 1.08}, "zout": {"scale": 0.93}, "r+": {"rotate_deg": 5},
         "r-": {"rotate_deg": -5}}
VIEW_SETS = {"none": ["id"], "flip": ["id", "flip"], "shift": ["id", "dx+", "dx-", "dy+", "dy-"],
             "zoom": ["id", "zin", "zout"], "rot": ["id", "r+", "r-"],
             "geo": ["id", "dx+", "dx-", "dy+", "dy-", "zin", "zout", "r+", "r-"], "all": list(VIEWS)}


def metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    from medhe.models.metrics import compute_metrics

    return {k: float(v) for k, v in compute_metrics("binary-class", labels.reshape(-1, 1), logits).items()}


def _splits(data_dir: str | None, dataset: str = DATASET):
    folder = resolve_data_dir(data_dir) / dataset
    return {s: load_dataset(folder, split=s, channels=1) for s in ("train", "val", "test")}


def ensemble(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Combine trained members: features concatenated, head = mean of the members' heads or a logistic-regression
    refit on the training features, whichever has the better validation accuracy (test is only reported)."""
    from sklearn.linear_model import LogisticRegression

    from medhe.models.artifact import load_artifact
    from medhe.models.mobilenet import build_linear_head, build_mobilenetv2_extractor

    members = [load_artifact(d) for d in args.ensemble]
    size = max(m.card["preprocessing"]["size"] for m in members)
    pre = Preprocess(channels=1, size=size, crop=None, mean=0.5, std=0.5)
    kwargs = {"in_channels": 1, "image_size": size, "members": [m.card["client_stage"]["arch_kwargs"] for m in members]}
    if args.views != "none":
        kwargs["views"] = [VIEWS[v] for v in VIEW_SETS[args.views]]
    extractor = build_mobilenetv2_extractor(**kwargs).eval()
    for slot, m in zip(extractor[0].members, members):
        slot.load_state_dict(m.client_model.state_dict())
    splits = _splits(args.data_dir)
    y = {s: d.labels.reshape(-1) for s, d in splits.items()}
    with torch.no_grad():
        feats = {s: torch.cat([extractor(torch.from_numpy(pre.batch(d.images[i:i + 64])))
                               for i in range(0, len(d), 64)]).double().numpy() for s, d in splits.items()}
    dims = [m.model[0].in_features for m in members]
    w_mean = np.concatenate([m.model[0].weight.detach().double().numpy() for m in members], 1) / len(members)
    b_mean = np.mean([m.model[0].bias.detach().double().numpy() for m in members], 0)
    candidates = {"mean": (w_mean, b_mean)}
    for c in (0.01, 0.1, 1.0):
        lr = LogisticRegression(C=c, max_iter=10000).fit(feats["train"], y["train"])
        w = np.stack([-lr.coef_[0] / 2, lr.coef_[0] / 2])  # two logits whose softmax is the fitted model
        b = np.array([-lr.intercept_[0] / 2, lr.intercept_[0] / 2])
        candidates[f"refit C={c}"] = (w, b)
    val_acc = {k: float(((feats["val"] @ w.T + b).argmax(1) == y["val"]).mean()) for k, (w, b) in candidates.items()}
    choice = "mean" if args.head == "mean" else max(val_acc, key=lambda k: (val_acc[k], k == "mean"))
    print(f"validation accuracy per head: {val_acc}; chosen: {choice}")
    head = build_linear_head(sum(dims), 2).eval()
    with torch.no_grad():
        head[0].weight.copy_(torch.from_numpy(candidates[choice][0]).float())
        head[0].bias.copy_(torch.from_numpy(candidates[choice][1]).float())
        logits = {s: head(torch.from_numpy(f).float()).double().numpy() for s, f in feats.items()}
    scores = {s: metrics(y[s], logits[s]) for s in ("val", "test")}
    print(f"val {scores['val']}; test {scores['test']}")
    if any(m.card["training"].get("fit_on") == "train+val" for m in members):
        scores["val_not_held_out"] = scores.pop("val")  # the members were trained on these images
    card = dict(members[0].card)
    card.update({
        "arch_kwargs": {"in_features": sum(dims), "num_outputs": 2},
        "preprocessing": pre.to_dict(),
        "metrics": scores,
        "training": {
            "command": "medhe recipe covid " + shlex.join(sys.argv[1:] if argv is None else argv),
            "ensemble_of": [m.card["training"] for m in members], "head": choice, "val_acc_per_head": val_acc,
            "test_time_views": args.views,
            **({"model_selection": json.loads(Path(args.model_selection).read_text())} if args.model_selection else {}),
            "selected_on": "val acc", "date": time.strftime("%Y-%m-%d"),
        },
        "client_stage": {"arch": "mobilenetv2-he", "arch_kwargs": kwargs},
    })
    card.pop("format", None)
    for key in ("training_data", "limitations", "code_revision", "code_revision_source", "created"):
        card.pop(key, None)  # the members' record: the ensemble's is written now
    out = save_artifact(args.out, head, complete_card(card, data_dir=args.data_dir), client_model=extractor)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medhe recipe covid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(PRETRAINED_DIR / "covid-cxr"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dataset", default=DATASET, choices=sorted(SPLIT_TEXT),
                    help="the COVID folder to train on (v2: the 6,381-image covid19_radiography_large)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width-mult", type=float, default=0.5)
    ap.add_argument("--feature-dim", type=int, default=32)
    ap.add_argument("--head-channels", type=int, default=None, help="width of the last conv before the pool")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated weights (0: off)")
    ap.add_argument("--augment", choices=sorted(AUGMENTS), default="default")
    ap.add_argument("--low-res", type=int, default=None, help="progressive resizing: early epochs at this size")
    ap.add_argument("--low-res-epochs", type=int, default=0, help="how many early epochs run at --low-res")
    ap.add_argument("--fit-on", choices=("train", "train+val"), default="train",
                    help="train+val: final fit of a recipe fixed on val; keeps the last epoch, val metrics are not "
                         "held out")
    ap.add_argument("--init", metavar="DIR", help="continue from a trained covid-cxr directory (same architecture)")
    ap.add_argument("--hold-test", action="store_true",
                    help="neither score nor print the test split: for members of a pre-registered selection, whose "
                         "final model is scored once (with --ensemble)")
    ap.add_argument("--head", choices=("auto", "mean"), default="auto",
                    help="with --ensemble: auto = the head with the best val accuracy (mean of the members' heads or a "
                         "logistic-regression refit); mean = fixed beforehand (members fitted on train+val)")
    ap.add_argument("--model-selection", metavar="JSON",
                    help="with --ensemble: a JSON file recorded as the card's training.model_selection")
    ap.add_argument("--views", choices=sorted(VIEW_SETS), default="none",
                    help="with --ensemble: client-side test-time augmentation (features averaged over these views)")
    ap.add_argument("--ensemble", nargs="+", metavar="DIR",
                    help="instead of training: combine trained covid-cxr directories into one ensemble model")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ensemble:
        return ensemble(args, argv)

    pre = Preprocess(channels=1, size=args.size, crop=None, mean=0.5, std=0.5)
    splits = _splits(args.data_dir, args.dataset)
    x = {s: pre.batch(d.images) for s, d in splits.items()}
    y = {s: d.labels.reshape(-1) for s, d in splits.items()}
    print({s: len(d) for s, d in splits.items()}, flush=True)

    extractor_kwargs = {"in_channels": 1, "image_size": args.size, "width_mult": args.width_mult,
                        "feature_dim": args.feature_dim, "blocks": "compact"}
    if args.head_channels:
        extractor_kwargs["head_channels"] = args.head_channels
    init, previous = None, None
    if args.init:
        from medhe.models.artifact import load_artifact

        start = load_artifact(args.init)
        extractor_kwargs = dict(start.card["client_stage"]["arch_kwargs"])
        init = (start.client_model.state_dict(), start.model.state_dict())
        previous = start.card["training"]
    fit_x, fit_y = x["train"], y["train"]
    if args.fit_on == "train+val":  # final fit of a recipe fixed on val: val is training data, last epoch is kept
        fit_x, fit_y = np.concatenate([x["train"], x["val"]]), np.concatenate([y["train"], y["val"]])
    result = train_split_model(fit_x, fit_y, x["val"], y["val"], extractor_kwargs=extractor_kwargs,
                               epochs=args.epochs, lr=args.lr, seed=args.seed, augment=AUGMENTS[args.augment],
                               ema_decay=args.ema or None, low_res=args.low_res,
                               low_res_epochs=args.low_res_epochs, init=init,
                               select="last" if args.fit_on == "train+val" else "best-val",
                               log=lambda m: print(m, flush=True))
    scored = ("val",) if args.hold_test else ("val", "test")
    scores = {s: metrics(y[s], predict_logits(result.extractor, result.head, x[s])) for s in scored}
    print(f"best epoch {result.best_epoch}, {result.seconds:.0f}s; "
          + "; ".join(f"{s} {scores[s]}" for s in scored) + ("; test held back" if args.hold_test else ""))

    card = {
        "name": "covid-cxr",
        "arch": "linear-head",
        "arch_kwargs": {"in_features": args.feature_dim, "num_outputs": 2},
        "task": splits["train"].task,
        "labels": list(splits["train"].label_names),
        "dataset": {"name": args.dataset, "split": SPLIT_TEXT.get(args.dataset, SPLIT_TEXT[DATASET]),
                    "sizes": {s: len(d) for s, d in splits.items()}},
        "preprocessing": pre.to_dict(),
        "metrics": scores,
        "activation_ranges": {},
        "training": {
            "command": "medhe recipe covid " + shlex.join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "epochs": args.epochs, "best_epoch": result.best_epoch,
            "selected_on": "val acc" if args.fit_on == "train" else "none: last epoch (val is training data)",
            "fit_on": args.fit_on,
            "lr": args.lr, "optimizer": "AdamW + one-cycle", "augmentation": AUGMENTS[args.augment].to_dict(),
            "ema_decay": args.ema, "low_res": args.low_res, "low_res_epochs": args.low_res_epochs,
            "continued_from": previous,
            "seconds": round(result.seconds, 1), "history": result.history,
            "date": time.strftime("%Y-%m-%d"),
        },
        "client_stage": {"arch": "mobilenetv2-he", "arch_kwargs": extractor_kwargs},
        "scheme_options": {"default_scheme": "paillier", "feature_bound": FEATURE_BOUND},
    }
    if args.dataset != DATASET:  # v2: the shortcut audit beside the whole split, as covid-cxr-ckks v2 does
        from medhe.data.folder import audit_mask
        from medhe.recipes.cxr_ckks import TARGETS

        audit = TARGETS["covid-cxr-ckks"].audit
        card.update(version="2", positive_label="COVID", audit=dict(audit))
        for s in scored:
            keep = audit_mask(splits[s], audit, args.data_dir)
            z = predict_logits(result.extractor, result.head, x[s][keep])
            card["metrics"][f"{s}_{audit['name']}"] = {"n": int(keep.sum()), **metrics(y[s][keep], z)}
        print({k: v for k, v in card["metrics"].items() if audit["name"] in k})
    out = save_artifact(args.out, result.head, complete_card(card, data_dir=args.data_dir),
                        client_model=result.extractor)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
