"""``medhe predict``: diagnose images on a medhe server under encryption (the secret key stays here)."""

from __future__ import annotations

import argparse
import json
import sys

from medhe.service import protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="encrypted diagnosis of PNG/JPEG/DICOM images on a medhe server",
                       description="Preprocess and encrypt images locally, let the server evaluate the model on the "
                                   "ciphertexts, decrypt the results here. Only public keys and ciphertexts leave "
                                   "this machine.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="PNG, JPEG or DICOM files")
    p.add_argument("--batch", metavar="FOLDER",
                   help="every image in FOLDER through the server's batch mode (CKKS, thousands of images per "
                        "request); writes one CSV (or JSON) of diagnoses")
    p.add_argument("--out", metavar="FILE", help="--batch: write the table here (.csv or .json; atomic)")
    p.add_argument("--server", required=True, metavar="URL", help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="served model id (needed when the server offers several)")
    p.add_argument("--token", help=f"bearer token (default: ${protocol.TOKEN_ENV})")
    p.add_argument("--cacert", help="CA bundle to verify a self-signed TLS certificate")
    p.add_argument("--keys", metavar="KEYDIR",
                   help="encrypted models only: the key set (medhe keygen) the served model's weights are "
                        "encrypted under; its secret key stays here")
    unusual = p.add_mutually_exclusive_group()
    unusual.add_argument("--allow-unusual", action="store_true",
                         help="diagnose images that look unlike the model's training data (size, channels, "
                              "intensity statistics: a 1x1 PNG, a colour photo, a blank frame) instead of refusing "
                              "them before anything is encrypted or sent; their results are marked unreliable "
                              "('unreliable: true' in --json and in --batch tables)")
    unusual.add_argument("--strict", action="store_true",
                         help="refuse such images (the default now; kept so that older scripts keep working)")
    p.add_argument("--skip-bad", action="store_true",
                   help="--batch: list and skip unreadable files and images unlike the training data")
    p.add_argument("--coverage", type=float, metavar="C",
                   help="models with a calibration record: coverage of the prediction set shown beside the "
                        "calibrated probability, e.g. 0.95 (default: the record's, 0.9); the set holds the true "
                        "label for that share of images like the model's validation images")
    p.add_argument("--abstain", action="store_true",
                   help="give no diagnosis unless the prediction set is a single label (multi-label: every label's "
                        "set is); the image is reported as 'no diagnosis (abstained)' with its set. Needs a model "
                        "with a calibration record")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document naming model and model_version, with every result: per image "
                        "model, model_version, label (top class), probabilities, "
                        "logits, and positive (multi-label models: the labels at probability >= 0.5; always [] "
                        "for single-label models, whose answer is label), warnings (why an image may be unlike the "
                        "model's training data; the same checks as medhe ui) and unreliable (true when there are "
                        "any, with --allow-unusual); calibrated models add "
                        "calibrated_probabilities, prediction_set, prediction_set_text, coverage and abstained "
                        "(label null when abstained)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medhe.errors import MedheError
    from medhe.service.client import Client

    if args.batch:
        if args.images:
            raise MedheError("give either IMAGE files or --batch FOLDER, not both")
        if args.keys:
            raise MedheError("--keys (encrypted models) does not work with --batch FOLDER yet")
        from medhe.cli.predict_batch import run_batch

        return run_batch(args)
    if not args.images:
        raise MedheError("no images: give IMAGE files, or --batch FOLDER for a whole folder")
    if args.out or args.skip_bad:
        raise MedheError("--out and --skip-bad work with --batch FOLDER only")
    from medhe.progress import busy

    from medhe.data import read_image

    images = [read_image(path) for path in args.images]  # an unreadable or oversized file fails here, locally
    with Client(args.server, token=args.token, verify=args.cacert or True, keys=args.keys) as client:
        # the input checks first (medhe.data.guard, the page's too): an unusual image is refused before any key
        # is generated or anything is sent, unless --allow-unusual
        checks = input_checks(images, client.model_info(args.model)["preprocessing"])
        del images  # diagnose_many reads each file again, one at a time
        flagged = [(path, w) for path, w in zip(args.images, checks) if w]
        if flagged and not args.allow_unusual:
            from medhe.data.guard import refusal

            path, warnings = flagged[0]
            more = len(flagged) - 1
            others = f" (and {more} more image{'s' if more > 1 else ''})" if more else ""
            raise MedheError(refusal(f"{path}{others}", warnings, "pass --allow-unusual"))
        with busy("keys, encryption and server evaluation", not args.json and len(args.images) == 1
                  and sys.stderr.isatty()):
            results = client.diagnose_many(args.images, model=args.model,
                                           progress=not args.json and len(args.images) > 1 and sys.stderr.isatty(),
                                           coverage=args.coverage, abstain=args.abstain,
                                           allow_unusual=args.allow_unusual)  # refused above unless allowed
        info = client.model_info(results[0].model)
        client.forget_keys()
    if args.json:  # the model and its card version (model cards v2) at the top and in every result
        print(json.dumps({"server": args.server, "model": results[0].model,
                          "model_version": str(info.get("version") or "unknown"),
                          "results": [{**r.to_dict(), "warnings": w, "unreliable": bool(w)}
                                      for r, w in zip(results, checks)]}, indent=2))
        return 0
    print(f"model {results[0].model} v{info.get('version') or 'unknown'}", file=sys.stderr)
    for r, warnings in zip(results, checks):
        print(format_result(r) + ("  [unreliable: unlike the training data]" if warnings else ""))
        for warning in warnings:
            print(f"  check: {warning}")
    return 0


def input_checks(images: list, preprocessing: dict) -> list[list[str]]:
    """Per image, why it may be unlike the model's training data (``medhe.data.guard``; the page shows the same)."""
    from medhe.data import Preprocess
    from medhe.data.guard import check_image

    pre = Preprocess.from_dict(preprocessing)
    return [check_image(image, pre) for image in images]


def format_result(r) -> str:
    """One line per image: the top label and its probability, or every positive label for multi-label tasks;
    calibrated models: the calibrated probability and the prediction set (or that it abstained)."""
    if r.calibrated is not None:
        return format_calibrated(r)
    if r.task == "multi-label":
        found = ", ".join(f"{name} {r.probabilities[name]:.3f}" for name in r.positive) or "no finding"
        return f"{r.source}: {found}"
    return f"{r.source}: {r.label} (p={r.probabilities[r.label]:.3f})"


def format_calibrated(r) -> str:
    """``scan.png: pneumonia (calibrated p=0.962; 90% set: pneumonia)``, or ``no diagnosis (abstained: ...)``."""
    pct = f"{r.coverage:.0%}" if round(r.coverage * 100, 6).is_integer() else f"{r.coverage:.1%}"
    if r.task == "multi-label":
        found = ", ".join(f"{name} {r.calibrated[name]:.3f}" for name in r.positive) or "no finding"
        head = "no diagnosis (abstained)" if r.abstained else found
        return f"{r.source}: {head}  [calibrated; {pct} sets: {r.set_text}]"
    if r.abstained:
        top = max(r.calibrated, key=r.calibrated.get)
        return (f"{r.source}: no diagnosis (abstained: the {pct} prediction set is not a single label - "
                f"{r.set_text}; top label {top}, calibrated p={r.calibrated[top]:.3f})")
    return f"{r.source}: {r.label} (calibrated p={r.calibrated[r.label]:.3f}; {pct} set: {r.set_text})"
