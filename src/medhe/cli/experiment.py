"""``medhe experiment {p4,...}``: documented research experiments that reproduce or test published claims.

Each experiment is one entry of ``EXPERIMENTS`` (help text, argument builder, runner), so adding one is adding an
entry; the heavy modules are imported only when that experiment runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from medhe.textformat import table


def _p4_args(p: argparse.ArgumentParser) -> None:
    from medhe.experiments.p4_modes import MODES

    p.add_argument("--data-dir", help="folder holding covid19_radiography_subset (default: $MEDHE_DATA)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels before encryption (default 64)")
    p.add_argument("--key-bits", type=int, default=256,
                   help="Paillier modulus for the pixel encryption (default 256: the 8-bit residue's statistics do "
                        "not depend on it, and one encryption per pixel at 3072 bits would take ~30 hours)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated randomness modes: fresh (per pixel, correct Paillier), image, global")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N images of each split (smoke runs)")
    p.add_argument("--out", default="reports/p4", help="folder for p4_report.json / .md and example images")


def _p4_run(args: argparse.Namespace) -> int:
    from medhe.experiments.p4 import run_p4_experiment

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    report = run_p4_experiment(args.data_dir, size=args.size, key_bits=args.key_bits, modes=modes,
                               epochs=args.epochs, seed=args.seed, limit=args.limit, out_dir=args.out,
                               command="medhe " + shlex.join(sys.argv[1:]),
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    rows = [("plain", report["plain"]["test"]["acc"], report["plain"]["test"]["auc"], None)]
    rows += [(m, r["test"]["acc"], r["test"]["auc"], r["mutual_information"]["bits"])
             for m, r in report["modes"].items()]
    print(table(("images", "test ACC", "test AUC", "I(pixel;byte) bits"), rows))
    print()
    print(report["explanation"])
    for path in report.get("written", []):
        print(f"wrote {path}")
    return 0


def _latent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoders", default="runs/latent",
                   help="folder holding vq-f2 .. vq-f16 (train them with medhe train-autoencoder --factor F)")
    p.add_argument("--out", default="runs/latent/experiment", help="folder for latent_table.md/.json and the plot")
    p.add_argument("--data-dir", help="folder holding nih_chestxray14_subset (default: $MEDHE_DATA)")
    p.add_argument("--factors", default="2,4,8,16")
    p.add_argument("--pixel-sizes", default="64,256", help="pixel-space baselines to add as rows")
    p.add_argument("--enc-limit", type=int, help="encrypt only the first N test images per row")
    p.add_argument("--no-encrypted", action="store_true", help="plain metrics only")
    p.add_argument("--plan-only", action="store_true", help="compile each row for CKKS but do not run it")
    p.add_argument("--reuse", action="store_true", help="score row models already under --out instead of retraining")
    p.add_argument("--pixel-epochs", type=int, help="epochs for the 256x256 pixel row (default: every row's 60)")
    p.add_argument("--f8-encrypted", help="JSON report of an encrypted run of the shipped cxr14-latent")
    p.add_argument("--shipped-f8", action="store_true",
                   help="score the shipped cxr14-latent as the f8 row instead of training one on --autoencoders' vq-f8")


def _latent_run(args: argparse.Namespace) -> int:
    from medhe.experiments.latent import run_latent_experiment

    run_latent_experiment(
        tuple(int(f) for f in args.factors.split(",") if f), args.autoencoders, args.out, args.data_dir,
        encrypted="plan" if args.plan_only else not args.no_encrypted, enc_limit=args.enc_limit,
        pixel_sizes=tuple(int(s) for s in args.pixel_sizes.split(",") if s), reuse=args.reuse,
        f8_encrypted=args.f8_encrypted, use_shipped_f8=args.shipped_f8, pixel_epochs={256: args.pixel_epochs} if args.pixel_epochs else None)
    print(f"wrote the P1 table to {args.out}/latent_table.md (and .json, latent_plot.png)")
    return 0


def _latent_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", default="vq-f8", help="the VQ autoencoder whose latents the classifier reads")
    p.add_argument("--out", default="runs/latent/cxr14-latent", help="folder for the exported model")
    p.add_argument("--data-dir", help="folder holding nih_chestxray14_subset (default: $MEDHE_DATA)")
    p.add_argument("--arch-kwargs", default="{}", help="JSON overriding the classifier's DEFAULT_ARCH_KWARGS")
    p.add_argument("--epochs", type=int, help="training epochs (default: the shipped model's, DEFAULT_TRAIN)")


def _latent_export_run(args: argparse.Namespace) -> int:
    import json

    from medhe.errors import MedheError
    from medhe.experiments.latent import DEFAULT_TRAIN, train_default_model

    try:
        arch_kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        raise MedheError(f"--arch-kwargs is not JSON ({exc.msg}): e.g. '{{\"width\": 16}}'") from None
    path = train_default_model(args.autoencoder, args.out, args.data_dir, command="medhe " + shlex.join(sys.argv[1:]),
                               arch_kwargs=arch_kwargs, train={"epochs": DEFAULT_TRAIN["epochs"] if args.epochs is None else args.epochs},
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"model written to {path}")
    return 0


def _covid_common_args(p: argparse.ArgumentParser, out: str, out_help: str, variants_help: str) -> None:
    p.add_argument("--out", default=out, help=out_help)
    p.add_argument("--data-dir", help="folder holding covid19_radiography_subset (default: $MEDHE_DATA)")
    p.add_argument("--variants", help=variants_help)  # the default (all) resolves in the run: no torch for --help


def _variants(args: argparse.Namespace, known: Any) -> list[str]:
    return list(known) if args.variants is None else [v for v in args.variants.split(",") if v]


def _covid_ckks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", default="runs/latent/vq-f8",
                   help="f8 VQ autoencoder trained without the COVID val/test images (the client stage)")
    _covid_common_args(p, "runs/covid-ckks", "folder for model/ and selection.json",
                       "comma-separated classifier variants to compare on val (default: all)")
    p.add_argument("--only-train", action="store_true",
                   help="train the variants into --out/variants and stop (no selection, no test split); run again "
                        "without it to select among every variant on val and score the chosen one on test")


def _covid_ckks_run(args: argparse.Namespace) -> int:
    from medhe.experiments.covid_latent import VARIANTS, train_covid_ckks

    result = train_covid_ckks(args.autoencoder, args.out, _variants(args, VARIANTS),
                              args.data_dir, command="medhe " + shlex.join(sys.argv[1:]),
                              log=lambda m: print(m, file=sys.stderr, flush=True), only_train=args.only_train)
    print(table(("variant", "val ACC", "val AUC", "best epoch"),
                [(t["variant"], t["val"]["acc"], t["val"]["auc"], t["best_epoch"]) for t in result["tried"]]))
    if args.only_train:
        return 0
    test = result["metrics"]["test"]
    print(f"chosen on val: {result['chosen']}; test ACC {test['acc']:.4f} AUC {test['auc']:.4f} (scored once)")
    print(f"model written to {result['model']}")
    return 0


def _covid_pixel_args(p: argparse.ArgumentParser) -> None:
    _covid_common_args(p, "runs/covid-px", "folder for variants/, model/ and selection.json",
                       "comma-separated pixel variants to train and compare on val (default: all)")
    p.add_argument("--latent", default="covid-cxr-ckks",
                   help="the latent family's model (name or folder): its model_selection val scores join the "
                        "comparison (its test score is not read); '' for pixel variants only")
    p.add_argument("--only-train", action="store_true",
                   help="train the variants into --out/variants and stop (no selection, no test split)")


def _covid_pixel_run(args: argparse.Namespace) -> int:
    from medhe.experiments.covid_pixel import VARIANTS, train_covid_pixel
    from medhe.models.artifact import PRETRAINED_DIR

    latent = args.latent or None
    if latent and not Path(latent).expanduser().exists():
        latent = PRETRAINED_DIR / latent
    result = train_covid_pixel(args.out, _variants(args, VARIANTS), args.data_dir,
                               command="medhe " + shlex.join(sys.argv[1:]),
                               log=lambda m: print(m, file=sys.stderr, flush=True), only_train=args.only_train,
                               latent_card=latent)
    rows = result["tried"] + result.get("latent", [])
    print(table(("variant", "val ACC", "val AUC", "best epoch"),
                [(t["variant"], t["val"]["acc"], t["val"]["auc"], t["best_epoch"]) for t in rows]))
    if args.only_train:
        return 0
    if "metrics" not in result:
        print(f"chosen on val: {result['chosen']} (latent family); no pixel model exported, no test split scored")
        return 0
    test = result["metrics"]["test"]
    print(f"chosen on val: {result['chosen']}; test ACC {test['acc']:.4f} AUC {test['auc']:.4f} (scored once)")
    print(f"model written to {result['model']}")
    return 0


#: name -> (help, add arguments, run)
EXPERIMENTS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                             Callable[[argparse.Namespace], int]]] = {
    "p4": ("replicate P4: train a CNN on Paillier-encrypted, 8-bit re-saved chest X-rays", _p4_args, _p4_run),
    "latent": ("reproduce P1's table: one row per VQ downsampling factor (and pixel space), plain and CKKS",
               _latent_args, _latent_run),
    "latent-export": ("train and export the shipped latent-space classifier (cxr14-latent) on an autoencoder's "
                      "latents", _latent_export_args, _latent_export_run),
    "covid-ckks": ("train covid-cxr-ckks: latent-hecnn on f8 latents of the COVID-19 Radiography subset, variants "
                   "chosen on val, test scored once", _covid_ckks_args, _covid_ckks_run),
    "covid-ckks-pixel": ("covid-cxr-ckks' pixel route: latent-hecnn on 128 px X-rays, chosen on val together with the "
                         "latent variants, test scored once", _covid_pixel_args, _covid_pixel_run),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a documented research experiment",
                       description="Documented experiments that replicate or test published claims; each writes "
                                   "a JSON and a Markdown report.")
    inner = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for name, (help_text, add_args, runner) in EXPERIMENTS.items():
        q = inner.add_parser(name, help=help_text, description=help_text)
        add_args(q)
        q.set_defaults(handler=runner)
    p.set_defaults(handler=lambda _args: (p.print_help(), 1)[1])
