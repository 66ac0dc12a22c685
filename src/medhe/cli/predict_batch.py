"""``medhe predict --batch FOLDER``: every image of a folder through the server's batch mode, one CSV/JSON out.

The folder is read and checked completely before any key generation or upload, so a bad file is reported at
once: an unreadable file, or an image unlike the model's training data (``medhe.data.guard``, as in single-image
mode), is an error naming it (or, with ``--skip-bad``, listed and skipped; ``--allow-unusual`` diagnoses unusual
images, marked unreliable). Images of any size or channel count are preprocessed one by one exactly as in
single-image mode (the model's channels, crop and resize), so a folder of mixed exports works. The result file is
written atomically: either the complete table or nothing.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medhe import atomic
from medhe.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ""}


def read_folder(folder: str | Path, skip_bad: bool = False) -> tuple[list[np.ndarray], list[str], list[dict]]:
    """(images, their paths, skipped files with the reason) of every image file in ``folder`` (sorted)."""
    from medhe.data import read_image

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{folder} is not a folder: pass a folder of PNG/JPEG/DICOM images to --batch")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    images, sources, skipped = [], [], []
    for path in files:
        try:
            img = read_image(path)
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{path}: cannot be read ({exc}); fix or remove it, or pass --skip-bad to skip "
                                "unreadable files") from None
            skipped.append({"source": str(path), "error": str(exc)})
            continue
        images.append(img)
        sources.append(str(path))
    if not images:
        raise DataError(f"{folder} holds no readable images ({', '.join(sorted(s or 'no suffix' for s in IMAGE_SUFFIXES))})")
    return images, sources, skipped


def check_folder(images: list[np.ndarray], sources: list[str], skipped: list[dict], preprocessing: dict,
                 allow_unusual: bool, skip_bad: bool) -> tuple[list[np.ndarray], list[str], list[list[str]]]:
    """The input checks of single-image mode on every image: (images, sources, their warnings) to diagnose; an
    unusual image refuses the batch, is skipped (``skip_bad``, added to ``skipped``) or is kept, marked."""
    from medhe.data import Preprocess
    from medhe.data.guard import check_image, refusal

    pre = Preprocess.from_dict(preprocessing)
    kept: tuple[list, list, list] = ([], [], [])
    for img, source in zip(images, sources):
        warnings = check_image(img, pre)
        if warnings and not allow_unusual:
            if not skip_bad:
                raise DataError(refusal(source, warnings, "pass --skip-bad to skip such images or --allow-unusual"))
            skipped.append({"source": source, "error": f"looks unlike the model's training data: {warnings[0]}"})
            continue
        for part, value in zip(kept, (img, source, warnings)):
            part.append(value)
    if not kept[0]:
        raise DataError(f"no image of the folder is left to diagnose ({len(skipped)} skipped)")
    return kept


def render(results: list[Any], skipped: list[dict], fmt: str, server: str, model: str,
           version: str | None = None, warnings: list[list[str]] | None = None) -> str:
    """The table as JSON or CSV; both name the model and its card version (model cards v2) on every row, and
    mark the results of unusual images (``warnings``, with --allow-unusual) unreliable."""
    version = version or "unknown"
    warnings = warnings if warnings is not None else [[] for _ in results]
    if fmt == "json":
        return json.dumps({"server": server, "model": model, "model_version": version,
                           "results": [{**r.to_dict(), "warnings": w, "unreliable": bool(w)}
                                       for r, w in zip(results, warnings)], "skipped": skipped}, indent=2) + "\n"
    labels = list(results[0].probabilities) if results else []
    calibrated = bool(results) and results[0].calibrated is not None  # extra columns only for calibrated models
    extra = [*[f"calibrated_p_{name}" for name in labels], "prediction_set", "coverage", "abstained"] \
        if calibrated else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["source", "model", "model_version", "label", "positive", *[f"p_{name}" for name in labels],
                     *extra, "unreliable", "warnings", "error"])
    for r, w in zip(results, warnings):
        more = [*[f"{r.calibrated[n]:.6f}" for n in labels], r.set_text, f"{r.coverage:g}",
                str(r.abstained).lower()] if calibrated else []
        writer.writerow([r.source, model, version, r.label or "", ";".join(r.positive),
                         *[f"{r.probabilities[n]:.6f}" for n in labels], *more,
                         str(bool(w)).lower(), "; ".join(w), ""])
    for s in skipped:
        writer.writerow([s["source"], model, version, "", "", *[""] * (len(labels) + len(extra)), "", "", s["error"]])
    return buf.getvalue()


def run_batch(args: Any) -> int:
    from medhe.service.batch_client import BatchDiagnoser
    from medhe.service.client import Client

    images, sources, skipped = read_folder(args.batch, args.skip_bad)
    out = Path(args.out) if args.out else None
    fmt = "json" if args.json or (out is not None and out.suffix.lower() == ".json") else "csv"
    with Client(args.server, token=args.token, verify=args.cacert or True) as client:
        preprocessing = client.model_info(args.model)["preprocessing"]  # no keys yet: checks come first
        images, sources, warnings = check_folder(images, sources, skipped, preprocessing, args.allow_unusual,
                                                 args.skip_bad)
        for s in skipped:
            print(f"skipped {s['source']}: {s['error']}", file=sys.stderr)
        diagnoser = BatchDiagnoser(client, args.model)
        try:
            results = diagnoser.diagnose(images, sources, progress=sys.stderr.isatty(),
                                         coverage=args.coverage, abstain=args.abstain,
                                         allow_unusual=args.allow_unusual)  # refused above unless allowed
        finally:
            diagnoser.forget_keys()
    text = render(results, skipped, fmt, args.server, diagnoser.id, diagnoser.info.get("version"), warnings)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic.write_text(out, text)
        print(f"{len(results)} diagnoses written to {out}" + (f" ({len(skipped)} files skipped)" if skipped else ""),
              file=sys.stderr)
    return 0
