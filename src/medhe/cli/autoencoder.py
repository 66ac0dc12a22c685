"""``medhe train-autoencoder``: train the VQ autoencoder for one downsampling factor and report PSNR/SSIM."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-autoencoder", help="train the VQ autoencoder of the latent pipeline for one factor",
        description="Train a VQ autoencoder (encoder, codebook, decoder) on 256x256 chest X-rays (NIH train split + "
                    "COVID subset *train* splits); report PSNR/SSIM on the held-out NIH val+test images.")
    p.add_argument("--factor", type=int, default=8, choices=(2, 4, 8, 16), help="downsampling factor per side")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", default=None, help="output folder (default: runs/vq-f<F>)")
    p.add_argument("--data-dir", default=None, help="data folder (default: MEDHE_DATA or ~/.medhe/data)")
    p.add_argument("--recon-png", default=None, help="also write originals over reconstructions as a PNG grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=30.0, help="stop after the epoch that passes this budget")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (quick checks)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from medhe.errors import DataError
    from medhe.models import train_autoencoder as ta

    torch.set_num_threads(max(1, args.threads))
    out = args.out or f"runs/vq-f{args.factor}"
    images = ta.load_images(args.data_dir)
    if args.limit is not None:
        if args.limit < 1:
            raise DataError(f"--limit must be at least 1, not {args.limit}")
        images = images[:args.limit]
    ae, record = ta.train_autoencoder(args.factor, epochs=args.epochs, seed=args.seed, images=images,
                                      max_minutes=args.max_minutes, log=lambda m: print(m, flush=True))
    held_out = ta.load_images(args.data_dir, splits=("val", "test"), with_covid=False)
    if args.limit is not None:
        held_out = held_out[:args.limit]
    metrics = {"held_out": ta.evaluate_reconstruction(ae, held_out)}
    record["command"] = ta.command_line()
    record["data"] = {"nih_chestxray14_subset": "train split", "covid19_radiography_subset": "train split, resized to 256",
                      "limit": args.limit, "held_out": "nih_chestxray14_subset val+test"}
    ta.save_autoencoder(out, ae, metrics=metrics, training=record, data=ta.training_data(args.data_dir, args.limit))
    if args.recon_png:
        ta.save_recon_grid(ae, held_out, args.recon_png)
    print(json.dumps({"out": str(out), "factor": args.factor, **metrics["held_out"],
                      "train_minutes": record["train_minutes"], "epochs": record["epochs"]}))
    return 0
