"""``medhe evaluate``: one model, one scheme, one JSON report comparing plain and encrypted inference."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from medhe import atomic
from medhe.textformat import human_bytes, ms, table
from medhe.errors import MedheError
from medhe.data.evalsplit import load_eval_data
from medhe.he.scheme import SCHEMES, schemes

SCHEME_CHOICES = ("plain", *SCHEMES)  # the shipped ones; --scheme also takes schemes registered at run time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model in plaintext or under encryption",
                       description="Evaluate a model on a dataset split; encrypted schemes add encrypted metrics, "
                                   "agreement with plaintext, latency, sizes and parameters to the same JSON.")
    p.add_argument("--model", default="pneumoniamnist", help="shipped model name or model directory")
    p.add_argument("--scheme", choices=("plain", *schemes()), default="plain")
    p.add_argument("--dataset", help="MedMNIST flag or image folder with labels.csv (default: the model's own)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--limit", type=int,
                   help="evaluate only the first N images of the split (in file order: a small N may hold a "
                        "single class, which leaves AUC undefined)")
    p.add_argument("--sample", type=int, metavar="N",
                   help="evaluate N images spread evenly over the split (every k-th in file order, so every class "
                        "of a sorted folder is in); for long encrypted runs where the whole split takes hours")
    p.add_argument("--data-dir", help="folder with dataset files (default: $MEDHE_DATA or ~/.medhe/data)")
    p.add_argument("--json", dest="json_out", help="write the report to this file (its folder must exist)")
    p.add_argument("--report", dest="report_dir", metavar="DIR",
                   help="also write DIR/report.md with plots (ROC, logit scatter, latency, bytes); see medhe report")
    p.add_argument("--fhe", choices=("simulate", "execute"),
                   help="TFHE only (default simulate): Concrete's simulation (fast, and with medhe's exact rounding bit for bit what "
                        "execution computes) or real encrypted execution")
    p.add_argument("--n-execute", type=int, default=50,
                   help="TFHE --fhe execute only: how many of the images (the first ones) run encrypted; the "
                        "simulation always covers them all (default 50)")
    p.add_argument("--key-bits", type=int, default=3072,
                   help="Paillier only: modulus size (>= 3072, 128-bit security; 2048 is refused)")
    p.add_argument("--key-switching", choices=("seal", "hybrid"),
                   help="CKKS only: the evaluation keys' format, seal (SEAL's, the default) or hybrid (issue 29: a "
                        "few digits and several special primes chosen by the planner, keys several times smaller; "
                        "needs the native runtime)")
    p.add_argument("--debug-layers", action="store_true",
                   help="CKKS only: decrypt after every layer of the first image and compare with plaintext")
    p.add_argument("--batch", action="store_true",
                   help="CKKS only: one image per slot (4096 per ciphertext), the whole split through batch mode")
    p.add_argument("--encrypted-model", metavar="ENCDIR",
                   help="CKKS only: evaluate the encrypted-weight model in ENCDIR (medhe encrypt-model) beside the "
                        "plaintext-weight plan; needs --keys")
    p.add_argument("--keys", metavar="KEYDIR", help="with --encrypted-model: the key set its weights are encrypted "
                                                    "under (medhe keygen)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--coverage", type=float,
                   help="models with a calibration record (medhe calibrate): coverage of the conformal prediction "
                        "sets measured in the report's calibration block (default: the record's, 0.9)")
    p.set_defaults(handler=run)


def evaluate(model: str, scheme: str = "plain", dataset: str | None = None, split: str = "test",
             limit: int | None = None, data_dir: str | None = None, progress: bool = True,
             sample: int | None = None, **options: Any) -> dict[str, Any]:
    """The shared JSON report for ``model`` under ``scheme`` (plain metrics always included), with the card's
    audit subgroup (e.g. adult-only COVID images) scored beside the whole split when the card names one."""
    report = _evaluate(model, scheme, dataset, split, limit, data_dir, progress, sample=sample, **options)
    _add_provenance(report, model)
    if sample is not None:
        report["sample"] = {"requested": sample, "rule": "evenly spaced over the split in file order"}
    _add_audit(report, model, dataset, split, limit, data_dir, sample)
    _add_clinical(report, model)
    return report


def _add_provenance(report: dict[str, Any], model: str) -> None:
    """``model_version`` beside ``model``, and ``provenance``: the card's and this checkout's code revision, medhe's
    version, the weights' SHA-256 (docs/model-cards.md), so a report names exactly which model produced it."""
    from medhe.models.artifact import provenance

    block = provenance(model)
    report["model_version"] = block["model_version"]
    report["provenance"] = block


def _add_clinical(report: dict[str, Any], model: str) -> None:
    """``report["clinical"]``: threshold, sensitivity/specificity, confusion matrix (binary) or P1's multi-label
    set, each with a bootstrap 95 % interval, per logit set (docs/reports.md); the card may name the positive
    class (``positive_label``)."""
    from medhe.he.report import clinical_block
    from medhe.models.artifact import read_card, resolve_model_dir

    block = clinical_block(report, read_card(resolve_model_dir(model)).get("positive_label"))
    if block is not None:
        report["clinical"] = block


def _add_audit(report: dict[str, Any], model: str, dataset: str | None, split: str, limit: int | None,
               data_dir: str | None, sample: int | None = None) -> None:
    """``report["audit"]``: plain (and encrypted) metrics on the rows of the card's audit subgroup."""
    from medhe.data.folder import audit_mask
    from medhe.models.artifact import load_artifact
    from medhe.models.metrics import compute_metrics
    from medhe.models.predict import model_inputs, predict_logits

    artifact = load_artifact(model)
    audit = artifact.card.get("audit")
    if not audit or dataset not in (None, (artifact.card.get("dataset") or {}).get("name")):
        return
    _, ds = load_eval_data(artifact, dataset, split, limit, data_dir, sample)
    mask = audit_mask(ds, audit, data_dir)
    if mask is None or not mask.any():
        return
    block: dict[str, Any] = {"name": audit.get("name"), "column": audit.get("column"), "value": audit.get("value"),
                             "why": audit.get("why"), "n": int(mask.sum())}
    logits = report.get("logits") or {}
    plain = np.asarray(logits["plain"]) if "plain" in logits else predict_logits(artifact.model,
                                                                                 model_inputs(artifact, ds.images))
    block["plain"] = compute_metrics(artifact.task, ds.labels[mask], plain[mask])
    enc = logits.get("encrypted")
    if enc is not None and len(enc) == len(mask):
        block["encrypted"] = compute_metrics(artifact.task, ds.labels[mask], np.asarray(enc)[mask])
    report["audit"] = block


def _evaluate(model: str, scheme: str = "plain", dataset: str | None = None, split: str = "test",
              limit: int | None = None, data_dir: str | None = None, progress: bool = True,
              fhe: str | None = None, key_bits: int = 3072, debug_layers: bool = False,
              n_execute: int = 50, batch: bool = False, encrypted_model: str | None = None,
              keys: str | None = None, sample: int | None = None,
              key_switching: str | None = None) -> dict[str, Any]:
    """The shared JSON report for ``model`` under ``scheme`` (plain metrics always included)."""
    from medhe.models.artifact import load_artifact
    from medhe.models.metrics import compute_metrics
    from medhe.models.predict import model_inputs, predict_logits

    if n_execute < 1:
        raise MedheError(f"--n-execute must be at least 1, not {n_execute}")
    if fhe is not None and scheme != "tfhe":
        raise MedheError(f"--fhe {fhe} applies to --scheme tfhe only, not {scheme}; drop it")
    fhe = fhe or "simulate"
    if batch and (scheme != "ckks" or debug_layers):
        raise MedheError("--batch works with --scheme ckks only (and without --debug-layers)")
    if (encrypted_model is None) != (keys is None):
        raise MedheError("--encrypted-model ENCDIR and --keys KEYDIR go together: pass both or neither")
    if encrypted_model is not None and (scheme != "ckks" or debug_layers):
        raise MedheError("--encrypted-model works with --scheme ckks (and without --debug-layers)")
    if encrypted_model is not None and batch:
        raise MedheError("--batch and --encrypted-model are separate modes: pass one of them")
    if key_switching is not None and (scheme != "ckks" or batch or encrypted_model is not None):
        raise MedheError(f"--key-switching applies to --scheme ckks plans (not {scheme}, --batch or "
                         "--encrypted-model); drop it")
    artifact = load_artifact(model)
    name, ds = load_eval_data(artifact, dataset, split, limit, data_dir, sample)
    inputs = model_inputs(artifact, ds.images)
    plain_logits = predict_logits(artifact.model, inputs)
    from medhe.he.report import SCHEMA, compact
    from medhe.machine import machine_info

    report: dict[str, Any] = {
        "schema": SCHEMA, "dataset": name, "model": artifact.name, "scheme": scheme, "split": split,
        "n": int(len(ds.labels)), "task": artifact.task, "labels": list(artifact.labels),
        "plain": compute_metrics(artifact.task, ds.labels, plain_logits), "machine": machine_info(),
    }
    if scheme == "plain":  # per-image labels and logits, as encrypted reports have: ROC and clinical view
        report["logits"] = {"labels": np.asarray(ds.labels).astype(int).tolist(), "plain": compact(plain_logits)}
        return report
    from medhe.he.scheme import has_hook, scheme_hook

    if batch:
        return scheme_hook(scheme, "evaluate_batch")(artifact, inputs, ds.labels, report, plain_logits,
                                                     progress=progress)
    if has_hook(scheme, "evaluate"):  # a scheme with its own evaluation (TFHE: simulate, then execute a prefix)
        return scheme_hook(scheme, "evaluate")(artifact, inputs, ds.labels, report, plain_logits, progress=progress,
                                               fhe=fhe, n_execute=n_execute)
    if encrypted_model is not None:
        return scheme_hook(scheme, "evaluate_encrypted_model")(artifact, encrypted_model, keys, inputs, ds.labels,
                                                               report, plain_logits, progress=progress)
    from medhe.he.evaluate import evaluate_encrypted

    options: dict[str, Any] = {"key_bits": key_bits} if scheme == "paillier" else {}
    if key_switching is not None:
        options["key_switching"] = key_switching
    hook = None
    if debug_layers:
        if scheme != "ckks":
            raise MedheError("--debug-layers works with --scheme ckks only")

        layer_report = scheme_hook(scheme, "layer_report")

        def hook(server: Any) -> None:
            report["debug_layers"] = layer_report(server, inputs[0])

    return evaluate_encrypted(artifact, scheme, inputs, ds.labels, report, plain_logits,
                              progress=progress, compile_options=options, on_server=hook)


def print_report(report: dict[str, Any]) -> None:
    rows = [["plain", report["plain"].get("acc"), report["plain"].get("auc"), report["plain"].get("f1")]]
    for key in ("quantized", "simulated", "encrypted"):
        if isinstance(report.get(key), dict):
            m = report[key]
            label = key
            if key == "encrypted" and report.get("n_encrypted", report["n"]) < report["n"]:
                label = f"encrypted (first {report['n_encrypted']})"  # TFHE executes a prefix, simulates them all
            rows.append([label, m.get("acc"), m.get("auc"), m.get("f1")])
    version = f" v{report['model_version']}" if report.get("model_version") else ""
    print(f"\n{report['model']}{version} on {report['dataset']} ({report['split']}, n={report['n']}), "
          f"scheme {report['scheme']}")
    print(table(["", "ACC", "AUC", "F1"], rows))
    audit = report.get("audit")
    if isinstance(audit, dict):
        rows = [[k, audit[k].get("acc"), audit[k].get("auc"), audit[k].get("f1")]
                for k in ("plain", "encrypted") if isinstance(audit.get(k), dict)]
        print(f"{audit.get('name')} subgroup ({audit.get('column')} = {audit.get('value')}, n={audit['n']}):")
        print(table(["", "ACC", "AUC", "F1"], rows))
    sim = report.get("simulated_vs_quantized")
    if isinstance(sim, dict):
        print(f"simulated vs quantized program: bit-exact on {sim.get('bit_exact', 0):.1%} of {report['n']} images")
    ex = report.get("executed_vs_simulated")
    if isinstance(ex, dict):
        print(f"executed vs simulated: {ex.get('prediction_equal')}/{ex.get('n')} equal predictions, "
              f"{ex.get('bit_exact')}/{ex.get('n')} bit-exact outputs")
    if "agreement" in report:
        against = "the quantized program" if report.get("reference") == "quantized" else "plaintext"
        print(f"agreement with {against}: {report['agreement']:.4f}   "
              f"max |logit error|: {report.get('max_abs_logit_error', float('nan')):.2e}")
    lat = report.get("latency_ms") or {}
    stages = [(k, v) for k, v in lat.items() if isinstance(v, dict) and k != "keygen"]
    if stages:
        head = "latency per batch (ms)" if report.get("mode") == "batch" else "latency (ms)"
        print(table([head, "median", "p95"], [[k, ms(v.get("median")), ms(v.get("p95"))]
                                                        for k, v in stages]))
    if isinstance(lat.get("keygen"), dict):
        print(f"key generation: {ms(lat['keygen']['median'])} ms")
    sizes = {k: v for k, v in (report.get("bytes") or {}).items() if isinstance(v, (int, float))}
    if sizes:
        print("bytes: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in sizes.items() if isinstance(v, (int, float))))
    base = report.get("plaintext_weights")
    if isinstance(base, dict):
        print(f"plaintext-weight plan: agreement {base['agreement']:.4f}, max |logit error| "
              f"{base['max_abs_logit_error']:.2e}, eval median {base['latency_ms']['eval']['median']:.0f} ms "
              f"(encrypted weights: {lat['eval']['median']:.0f} ms)")
    for row in report.get("debug_layers") or []:
        print(f"  layer {row.get('layer')}: max |error| {row.get('max_abs_error', float('nan')):.2e}")
    print_clinical(report)


def _ci(entry: dict[str, Any] | None) -> str:
    """``0.912 [0.887, 0.934]``: a metric with its bootstrap 95 % interval."""
    if not entry or entry.get("value") is None:
        return "-"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def print_clinical(report: dict[str, Any]) -> None:
    """The clinician's block in a few terminal lines (the full block, per label too, is in the JSON)."""
    sets = {k: v for k, v in (report.get("clinical") or {}).items() if isinstance(v, dict)}
    if not sets:
        return
    first = next(iter(sets.values()))
    if first["kind"] == "binary":
        print(f"clinician's view: positive = {first['positive']['label']}, decision {first['threshold']['rule']}; "
              "95 % bootstrap intervals")
        rows = [[k, m["n"], _ci(m["sensitivity"]), _ci(m["specificity"]), _ci(m["ppv"]), _ci(m["npv"]),
                 "{tp}/{fn}/{fp}/{tn}".format(**m["confusion"])] for k, m in sets.items()]
        print(table(["", "n", "sensitivity", "specificity", "PPV", "NPV", "TP/FN/FP/TN"], rows))
    else:
        print(f"multi-label metrics ({first['threshold']['rule']}); 95 % bootstrap intervals, per label in the JSON")
        rows = [[k, m["n"], _ci(m["subset_accuracy"]), _ci(m["auc"]["macro"]), _ci(m["auc"]["micro"]),
                 _ci(m["f1"]["macro"])] for k, m in sets.items()]
        print(table(["", "n", "subset ACC", "macro AUC", "micro AUC", "macro F1"], rows))


def run(args: argparse.Namespace) -> int:
    from medhe.cli._paths import input_dir, output_dir, output_file

    json_out = output_file(args.json_out, "--json") if args.json_out else None
    calibration = calibration_record(args.model, args.coverage)  # a malformed record fails before any encryption
    report_dir = output_dir(args.report_dir, "--report") if args.report_dir else None
    args.data_dir = input_dir(args.data_dir, "--data-dir")
    report = evaluate(args.model, args.scheme, args.dataset, args.split, args.limit, args.data_dir,
                      progress=not args.no_progress, fhe=args.fhe, key_bits=args.key_bits,
                      debug_layers=args.debug_layers, n_execute=args.n_execute, batch=args.batch,
                      encrypted_model=args.encrypted_model, keys=args.keys, sample=args.sample,
                      key_switching=args.key_switching)
    if calibration is not None:
        add_calibration(report, calibration, args.model, args.dataset, args.split, args.limit, args.data_dir,
                        args.coverage, args.sample)
    print_report(report)
    print_calibration(report)
    if report["plain"].get("auc") is None and report["task"] != "multi-label":
        print(f"note: the {report['n']} images evaluated hold a single class, so AUC is undefined and F1 may be 0; "
              "raise --limit or drop it to evaluate the whole split")
    if json_out:
        atomic.write_json(json_out, _jsonable(report))
        print(f"report written to {json_out}")
    if report_dir:
        from medhe.reporting import write_report

        print(f"Markdown report written to {write_report([], report_dir, runs=[_jsonable(report)])}")
    return 0


def calibration_record(model: str, coverage: float | None = None) -> dict[str, Any] | None:
    """The model card's calibration record (checked), or None when it has none (a note says so if --coverage
    asked for sets)."""
    from medhe.models.artifact import read_card, resolve_model_dir
    from medhe.models.calibration import check_coverage, check_record

    if coverage is not None:
        check_coverage(coverage)
    path = resolve_model_dir(model)
    card = read_card(path)
    if card.get("calibration") is None:
        if coverage is not None:
            print(f"note: {card['name']} has no calibration record, so --coverage measures nothing; fit one with "
                  f"medhe calibrate {path}")
        return None
    return check_record(card["calibration"], card["task"], len(card["labels"]), where=f"{path}/card.json")


def add_calibration(report: dict[str, Any], record: dict[str, Any], model: str, dataset: str | None, split: str,
                    limit: int | None, data_dir: str | None, coverage: float | None = None,
                    sample: int | None = None) -> None:
    """``report["calibration"]``: ECE before/after and conformal set statistics, plain and encrypted.

    Uses the report's own per-image logits (5 decimals) when it has them, so plain and encrypted sets are compared
    at the same precision and anyone can recompute the block from the JSON; a plain run has none, so its logits
    are computed again here."""
    from medhe.models.calibration import evaluation_block

    logits = report.get("logits") or {}
    if "plain" in logits and "labels" in logits:
        labels, plain = np.asarray(logits["labels"]), np.asarray(logits["plain"], dtype=np.float64)
    else:
        from medhe.models.artifact import load_artifact
        from medhe.models.predict import model_inputs, predict_logits

        artifact = load_artifact(model)
        _, ds = load_eval_data(artifact, dataset, split, limit, data_dir, sample)
        labels, plain = ds.labels, predict_logits(artifact.model, model_inputs(artifact, ds.images))
    enc = logits.get("encrypted")
    enc = np.asarray(enc, dtype=np.float64) if enc is not None and len(enc) else None
    report["calibration"] = evaluation_block(record, report["task"], labels, plain, enc, coverage)


def print_calibration(report: dict[str, Any]) -> None:
    block = report.get("calibration")
    if not isinstance(block, dict):
        return
    t = np.atleast_1d(block["temperature"])
    print(f"calibration (temperature {'%.3f' % t[0] if len(t) == 1 else 'per label'}, fitted on "
          f"{block.get('fitted_on')}), prediction sets at coverage {block['coverage_target']:g}:")
    rows = [[side, b["ece_before"], b["ece_after"], b["coverage"], b["mean_set_size"], b["singletons"], b["empty"]]
            for side in ("plain", "encrypted") if isinstance(b := block.get(side), dict)]
    print(table(["", "ECE before", "ECE after", "coverage", "mean size", "singletons", "empty"], rows))
    if block.get("sets_identical_plain_encrypted") is not None:
        print(f"sets identical plain vs encrypted: {block['sets_identical_plain_encrypted']}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(_jsonable(report), indent=2)
