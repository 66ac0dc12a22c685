"""``medhe calibrate MODEL_DIR``: fit temperature scaling and conformal scores on the validation split and record
them in the model's card (``card["calibration"]``), for clients to apply to their decrypted logits.

Fitting happens on validation only: test is what measures calibration afterwards (``medhe evaluate``), and a
model selected or calibrated on test would report optimistic numbers.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from medhe.errors import ArtifactError, DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit calibrated probabilities and conformal prediction sets on validation",
                       description="Compute the model's plain logits on its dataset's validation split, fit a "
                                   "temperature (softmax(z/T); multi-label: one T per label) by minimising the "
                                   "NLL, and store it with the sorted split-conformal scores in MODEL_DIR/card.json "
                                   "(atomically). Clients apply it to decrypted logits: calibrated probabilities "
                                   "and prediction sets at any coverage.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (or a shipped model's name)")
    p.add_argument("--coverage", type=float, default=0.9,
                   help="default coverage recorded for prediction sets (clients may ask for another; default 0.9)")
    p.add_argument("--split", default="val", choices=("val", "test", "train"),
                   help="split to fit on: only val is accepted (test measures calibration, train is what the "
                        "model fitted and is over-confident on)")
    p.add_argument("--data-dir", help="folder with dataset files (default: $MEDHE_DATA or ~/.medhe/data)")
    p.add_argument("--dry-run", action="store_true", help="fit and print, but leave card.json unchanged")
    p.add_argument("--json", action="store_true", help="print the record (without its scores) as JSON")
    p.set_defaults(handler=run)


def calibrate(model: str, coverage: float = 0.9, split: str = "val", data_dir: str | None = None,
              write: bool = True) -> dict[str, Any]:
    """Fit the calibration record of ``model`` on ``split`` (val only) and, with ``write``, store it in card.json."""
    from medhe import atomic
    from medhe.data.evalsplit import load_eval_data
    from medhe.models.artifact import CARD, load_artifact
    from medhe.models.calibration import fit_calibration
    from medhe.models.predict import model_inputs, predict_logits

    if split == "test":
        raise DataError("medhe calibrate fits on the validation split only: test must stay unseen to measure the "
                        "calibration (medhe evaluate --split test reports it); drop --split test")
    if split != "val":
        raise DataError(f"medhe calibrate fits on the validation split only, not {split!r}: the model is "
                        "over-confident on the images it was trained on; drop --split")
    if not 0.0 < coverage < 1.0:
        raise DataError(f"--coverage {coverage} must lie strictly between 0 and 1 (e.g. 0.9)")
    artifact = load_artifact(model)
    if artifact.path is None:
        raise ArtifactError(f"model {model!r} has no folder to write its calibration into")
    _, ds = load_eval_data(artifact, None, split, None, data_dir)
    logits = predict_logits(artifact.model, model_inputs(artifact, ds.images))
    if logits.shape[1] != len(artifact.labels):
        raise DataError(f"model {artifact.name!r} gives {logits.shape[1]} outputs for {len(artifact.labels)} labels")
    record = fit_calibration(artifact.task, ds.labels, logits, coverage=coverage, fitted_on=split)
    record["dataset"] = str(ds.name)
    if write:
        card_path = artifact.path / CARD
        try:  # the card as stored (key order, every field), with only the calibration entry replaced
            card = json.loads(card_path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{card_path} cannot be read back to record the calibration ({exc})") from None
        card["calibration"] = record
        atomic.write_json(card_path, card)
    return {"record": record, "path": str(artifact.path), "labels": artifact.labels, "logits": logits,
            "y": ds.labels, "task": artifact.task}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from medhe.cli._paths import input_dir
    from medhe.models.calibration import prediction_sets, set_summary

    result = calibrate(args.model, args.coverage, args.split, input_dir(args.data_dir, "--data-dir"),
                       write=not args.dry_run)
    rec, task = result["record"], result["task"]
    summary = set_summary(task, result["y"], prediction_sets(rec, task, result["logits"], args.coverage))
    if args.json:
        shown = {**rec, "conformal": {k: v for k, v in rec["conformal"].items() if k != "val_scores"}}
        print(json.dumps({**shown, "val_sets": summary, "written": not args.dry_run}, indent=2))
        return 0
    t = np.atleast_1d(rec["temperature"])
    temp = f"T = {t[0]:.4f}" if len(t) == 1 else f"T per label {t.min():.3f}..{t.max():.3f} (mean {t.mean():.3f})"
    print(f"{result['path']}: fitted on {rec['fitted_on']} (n={rec['n']}), {temp}")
    print(f"  NLL {rec['nll_val_before']:.4f} -> {rec['nll_val_after']:.4f}   "
          f"ECE ({rec['ece_bins']} bins) {rec['ece_val_before']:.4f} -> {rec['ece_val_after']:.4f}  (validation)")
    print(f"  prediction sets at coverage {args.coverage:g} on validation: coverage {summary['coverage']:.3f}, "
          f"mean size {summary['mean_set_size']:.3f}, singletons {summary['singletons']:.1%}, "
          f"empty {summary['empty']:.1%}")
    if rec.get("note"):
        print(f"  note: {rec['note']}")
    print("  card.json left unchanged (--dry-run)" if args.dry_run else
          "  recorded in card.json; measure it on test with: medhe evaluate --model "
          f"{result['path']} --split test")
    return 0
