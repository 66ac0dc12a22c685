"""``medhe score --ray [ADDRESS] --model NAME FOLDER``: a folder of scans diagnosed across a Ray cluster.

Unlike ``medhe predict`` there is no HTTP server in between: this process joins the cluster as a Ray driver,
keeps the secret key, encrypts the folder, lets Ray actors evaluate the ciphertexts on every node, decrypts the
results and writes one CSV/JSON table atomically (the same columns as ``medhe predict --batch``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="encrypted diagnosis of a whole folder across a Ray cluster",
                       description="Encrypt every image of FOLDER here, evaluate the ciphertexts in Ray actors "
                                   "across the cluster (for large folders in batch mode, one image per CKKS slot, "
                                   "where the model has it), decrypt here and write one CSV/JSON of diagnoses. Needs the optional "
                                   "extra: pip install -e \".[ray]\". See docs/scale-out.md.")
    p.add_argument("folder", metavar="FOLDER", help="folder of PNG/JPEG/DICOM images (one kind of scan)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", required=True,
                   help="the cluster's head (host:port, or auto); without ADDRESS a one-node Ray on this machine")
    p.add_argument("--model", required=True, metavar="NAME|DIR[:SCHEME]", help="model to score with")
    p.add_argument("--out", metavar="FILE", help="write the table here (.csv or .json; atomic); default stdout")
    p.add_argument("--json", action="store_true", help="JSON instead of CSV (also chosen by --out *.json)")
    p.add_argument("--skip-bad", action="store_true", help="list and skip unreadable files")
    p.add_argument("--ray-actors", type=int, metavar="N", help="actors to fan out over (default: one per free CPU of the cluster)")
    p.add_argument("--chunk", type=int, metavar="IMAGES",
                   help="batch mode: images per evaluation (default: the folder split evenly over the actors, at "
                        "most one full ciphertext batch)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--single", action="store_true",
                      help="one image per evaluation even where the model has a batch mode")
    mode.add_argument("--batch", action="store_true",
                      help="batch mode even for a small folder (default: batch mode from 256 images per actor, "
                           "where the model has it)")
    p.add_argument("--stats", metavar="FILE", help="also write the run's figures (JSON, atomic)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medhe import atomic
    from medhe.cli.predict_batch import read_folder, render
    from medhe.errors import MedheError
    from medhe.service.raycluster import connect, disconnect, require_ray
    from medhe.service.rayscore import score

    require_ray()  # before reading anything: one line naming the extra to install
    if args.chunk is not None and args.single:
        raise MedheError("--chunk applies to batch mode, not --single")
    for flag, value in (("--ray-actors", args.ray_actors), ("--chunk", args.chunk)):
        if value is not None and value < 1:
            raise MedheError(f"{flag} must be at least 1")
    if not Path(args.folder).is_dir():
        raise MedheError(f"{args.folder} is not a folder: pass a folder of PNG/JPEG/DICOM images to score")
    images, sources, skipped = read_folder(args.folder, args.skip_bad)
    for s in skipped:
        print(f"skipped {s['source']}: {s['error']}", file=sys.stderr)
    out = Path(args.out) if args.out else None
    fmt = "json" if args.json or (out is not None and out.suffix.lower() == ".json") else "csv"
    connect(args.ray or None)
    try:
        results, stats = score(args.model, images, sources, actors=args.ray_actors, chunk=args.chunk,
                               progress=sys.stderr.isatty(), batch=False if args.single else (True if args.batch else None))
    finally:
        disconnect()
    text = render(results, skipped, fmt, f"ray://{args.ray or 'local'}", stats["model"])
    if args.stats:
        atomic.write_text(args.stats, json.dumps(stats, indent=2) + "\n")
    if out is None:
        sys.stdout.write(text)
    else:
        atomic.write_text(out, text)
        print(f"{len(results)} diagnoses written to {out} ({stats['mode']} mode, {stats['actors']} actors, "
              f"{stats['retries']} retried)" + (f"; {len(skipped)} files skipped" if skipped else ""),
              file=sys.stderr)
    return 0
