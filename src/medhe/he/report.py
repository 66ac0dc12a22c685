"""The one JSON report shape every scheme's evaluation writes (documented in docs/reports.md).

CKKS, TFHE and Paillier fill the same fields, so tools (``medhe report``, comparisons across schemes) read one
schema. :func:`check_report` lists what a report lacks; the schema test runs it over every scheme.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medhe.stats import STAT_KEYS

SCHEMA = "medhe-report/1"
LATENCY_STAGES = ("keygen", "encrypt", "eval", "decrypt")
BYTES_FIELDS = ("input_ciphertext", "output_ciphertext", "evaluation_keys")
PARAMS_FIELDS = ("library", "security_bits", "backend")
MACHINE_FIELDS = ("platform", "processor", "cpus", "python", "load_average_1m")
#: the optional ``calibration`` block (cards with a calibration record; medhe.models.calibration.evaluation_block)
CALIBRATION_FIELDS = ("method", "temperature", "fitted_on", "coverage_target", "plain", "encrypted",
                      "sets_identical_plain_encrypted")
CALIBRATION_SIDE_FIELDS = ("ece_before", "ece_after", "coverage", "mean_set_size", "singletons", "empty", "n")
#: top-level fields of every encrypted report; ``encrypted`` may be null (TFHE --fhe simulate: see ``simulated``)
ENCRYPTED_FIELDS = ("schema", "model", "model_version", "dataset", "scheme", "split", "n", "task", "labels", "plain",
                    "encrypted", "reference", "agreement", "max_abs_logit_error", "latency_ms", "bytes", "params",
                    "machine", "logits", "provenance")
#: which model and code produced a report (medhe.models.artifact.provenance); every report has it, plain included
PROVENANCE_FIELDS = ("model", "model_version", "model_code_revision", "code_revision", "medhe_version",
                     "weights_sha256")


def compact(values: Any, digits: int = 5) -> list:
    """Logits as nested lists rounded to ``digits`` decimals: enough for ROC curves and scatter plots, and small."""
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def logits_block(labels: np.ndarray, plain: np.ndarray, encrypted: np.ndarray,
                 reference: np.ndarray | None = None) -> dict[str, Any]:
    """Per-image ground truth and logits. ``encrypted`` may cover a prefix of the images (TFHE execute);
    ``reference`` is what the encrypted computation implements when it is not the float model (TFHE: quantized)."""
    block = {"labels": np.asarray(labels).astype(int).tolist(), "plain": compact(plain),
             "encrypted": compact(encrypted)}
    if reference is not None:
        block["reference"] = compact(reference)
    return block


def clinical_block(report: dict[str, Any], positive_label: str | None = None) -> dict[str, Any] | None:
    """``report["clinical"]``: the clinician's metrics (``medhe.models.clinical``) of every logit set in
    ``report["logits"]``, keyed like the metric blocks (``plain``; ``encrypted``, or ``simulated`` for a TFHE
    simulation; ``quantized`` for TFHE's reference). Computed from the JSON's own labels and logits, so an older
    report without the block gets the same one back (``medhe report``). ``None``: no logits, or a task the block
    does not cover (multi-class, ordinal)."""
    from medhe.models.clinical import clinical_metrics, positive_class

    lg = report.get("logits")
    if not isinstance(lg, dict) or lg.get("labels") is None or lg.get("plain") is None:
        return None
    names = [str(n) for n in report.get("labels") or []] or None
    task = report.get("task")
    positive: tuple[int | None, str | None] = (None, None)
    if task == "binary-class" and names and len(names) == 2:
        positive = positive_class(names, positive_label)
    sets = {"plain": lg["plain"]}
    if lg.get("encrypted"):
        simulated = report.get("encrypted") is None and isinstance(report.get("simulated"), dict)
        sets["simulated" if simulated else "encrypted"] = lg["encrypted"]
    if lg.get("reference"):
        sets["quantized"] = lg["reference"]
    labels = np.asarray(lg["labels"])
    block = {key: clinical_metrics(task, labels[:len(z)], np.asarray(z, dtype=np.float64), names, *positive)
             for key, z in sets.items()}
    return block if any(v is not None for v in block.values()) else None


def check_report(report: dict[str, Any]) -> list[str]:
    """What ``report`` lacks or gets wrong against the shared schema (empty: conforms)."""
    problems = [f"missing {k}" for k in ENCRYPTED_FIELDS if k not in report]
    if problems:
        return problems
    if report["schema"] != SCHEMA:
        problems.append(f"schema is {report['schema']!r}, not {SCHEMA!r}")
    if report["encrypted"] is None and not isinstance(report.get("simulated"), dict):
        problems.append("encrypted is null but no simulated metrics stand beside it")
    if report["reference"] not in ("plain", "quantized"):
        problems.append(f"reference {report['reference']!r} is neither 'plain' nor 'quantized'")
    for stage in LATENCY_STAGES:
        if stage not in report["latency_ms"]:
            problems.append(f"missing latency_ms.{stage}")
        elif report["latency_ms"][stage] is not None and set(report["latency_ms"][stage]) != set(STAT_KEYS):
            problems.append(f"latency_ms.{stage} has keys {sorted(report['latency_ms'][stage])}, not {STAT_KEYS}")
    problems += [f"missing bytes.{k}" for k in BYTES_FIELDS if k not in report["bytes"]]
    problems += [f"missing params.{k}" for k in PARAMS_FIELDS if report["params"].get(k) is None]
    problems += [f"missing machine.{k}" for k in MACHINE_FIELDS if k not in report["machine"]]
    problems += check_provenance(report)
    logits = report["logits"]
    if not all(k in logits for k in ("labels", "plain", "encrypted")):
        problems.append("logits needs labels, plain and encrypted")
    elif len(logits["plain"]) != report["n"] or not 0 < len(logits["encrypted"]) <= report["n"]:
        problems.append("logits do not cover the report's images")
    return problems + check_calibration(report)


def check_provenance(report: dict[str, Any]) -> list[str]:
    """What the ``provenance`` block lacks (plain reports have it too; reports from before model cards v2 do not)."""
    block = report.get("provenance")
    if not isinstance(block, dict):
        return ["missing provenance"]
    problems = [f"missing provenance.{k}" for k in PROVENANCE_FIELDS if block.get(k) in (None, "")]
    if not problems and block["model_version"] != report.get("model_version"):
        problems.append("provenance.model_version differs from model_version")
    return problems


def check_calibration(report: dict[str, Any]) -> list[str]:
    """What the optional ``calibration`` block lacks (empty: absent or conforming)."""
    block = report.get("calibration")
    if block is None:
        return []
    problems = [f"missing calibration.{k}" for k in CALIBRATION_FIELDS if k not in block]
    for side in ("plain", "encrypted"):
        if isinstance(block.get(side), dict):
            problems += [f"missing calibration.{side}.{k}" for k in CALIBRATION_SIDE_FIELDS if k not in block[side]]
    if not problems and block["plain"] is None:
        problems.append("calibration.plain is null")
    return problems
