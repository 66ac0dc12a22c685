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
#: top-level fields of every encrypted report; ``encrypted`` may be null (TFHE --fhe simulate: see ``simulated``)
ENCRYPTED_FIELDS = ("schema", "model", "dataset", "scheme", "split", "n", "task", "labels", "plain", "encrypted",
                    "reference", "agreement", "max_abs_logit_error", "latency_ms", "bytes", "params", "machine",
                    "logits")


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
    logits = report["logits"]
    if not all(k in logits for k in ("labels", "plain", "encrypted")):
        problems.append("logits needs labels, plain and encrypted")
    elif len(logits["plain"]) != report["n"] or not 0 < len(logits["encrypted"]) <= report["n"]:
        problems.append("logits do not cover the report's images")
    return problems
