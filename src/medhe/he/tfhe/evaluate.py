"""The TFHE part of the shared evaluation report: every stage from float to encrypted, on the same images.

Four accuracies tell where accuracy goes: the network in plain float (quantizers off), the quantized integer
program in numpy, Concrete's simulation of the compiled circuit (full set, fast) and real encrypted execution
(a prefix of the set, because each image costs a second). Execution goes through the same client/server byte
path as the service (``medhe.he.evaluate.run_encrypted``), so latencies and sizes are what a client would see.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from medhe.errors import DataError
from medhe.he.evaluate import agreement, run_encrypted
from medhe.he.report import logits_block
from medhe.he.tfhe import compile_tfhe
from medhe.models.metrics import compute_metrics, predictions
from medhe.progress import busy
from medhe.stats import summarize


def float_logits(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    """The QAT network with its quantizers switched off (the 'plain float' column)."""
    was = model.quantized
    model.quantized = False
    try:
        model.eval()
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(inputs, dtype=np.float32))).double().numpy()
    finally:
        model.quantized = was


def evaluate_tfhe(artifact: Any, inputs: np.ndarray, labels: np.ndarray, fhe: str = "simulate",
                  progress: bool = True, n_execute: int | None = 50, server: Any = None,
                  **compile_options: Any) -> dict[str, Any]:
    """Report entries for ``--scheme tfhe``: plain float / quantized / simulated (/ encrypted) metrics and params.

    ``inputs``: preprocessed float images (N, C, H, W). ``fhe="execute"`` also runs the first ``n_execute`` images
    (None: all) encrypted and checks their predictions against the simulation of the same images.
    """
    inputs = np.asarray(inputs, dtype=np.float32)
    if inputs.ndim != 4 or len(inputs) != len(labels) or not len(inputs):
        raise DataError(f"TFHE evaluation needs at least one image and one label per image, got "
                        f"{len(inputs)} images of shape {tuple(inputs.shape[1:])} and {len(labels)} labels")
    task = artifact.task
    if server is None:
        with busy(f"compiling {getattr(artifact, 'name', 'model')} for tfhe ({fhe})", progress):
            server = compile_tfhe(artifact, fhe=fhe, **compile_options)
    integer = server.integer
    q = integer.quantize_input(inputs)
    ref_int = integer.run(q)
    sim_rows, sim_ms = [], []
    for row in q:  # one image at a time: the same per-image latency summary as encrypted execution
        t0 = time.perf_counter()
        sim_rows.append(server.simulate(row[None])[0])
        sim_ms.append((time.perf_counter() - t0) * 1e3)
    sim_int = np.stack(sim_rows)
    plain_logits = float_logits(artifact.model, inputs)
    quant_logits, sim_logits = integer.dequantize(ref_int), integer.dequantize(sim_int)
    plain = compute_metrics(task, labels, plain_logits)
    report: dict[str, Any] = {
        "fhe": fhe,
        # the shared schema's "plain" is the float network; the encrypted side computes the quantized program,
        # so agreement and logit error are measured against that ("reference": "quantized")
        "plain": plain,
        "plain_float": plain,  # pre-schema name of "plain", kept for readers of older reports
        "quantized": compute_metrics(task, labels, quant_logits),
        "simulated": compute_metrics(task, labels, sim_logits),
        "encrypted": None,
        "n_encrypted": 0,
        "reference": "quantized",
        "simulated_vs_quantized": {"prediction_agreement": agreement(task, quant_logits, sim_logits),
                                   "bit_exact": float(np.mean(np.all(sim_int == ref_int, axis=1)))},
        "simulate_ms_per_image": round(float(np.mean(sim_ms)), 3),
        "agreement": agreement(task, quant_logits, sim_logits),
        "max_abs_logit_error": float(np.max(np.abs(sim_logits - quant_logits))),
        # simulation encrypts nothing: only the (simulated) evaluation has a latency, no bytes cross a wire
        "latency_ms": {"keygen": None, "encrypt": None, "eval": summarize(sim_ms), "decrypt": None},
        "samples_ms": {"eval": [round(v, 3) for v in sim_ms]},
        "bytes": {"input_ciphertext": None, "output_ciphertext": None, "evaluation_keys": None},
        "params": {**server.params, **server.report_params()},
        "logits": logits_block(labels, plain_logits, sim_logits, reference=quant_logits),
    }
    if fhe != "execute":
        return report
    n = len(inputs) if n_execute is None else max(1, min(int(n_execute), len(inputs)))
    run = run_encrypted(server, inputs[:n], progress=progress, desc="tfhe execute")
    enc_logits = run["logits"]
    enc_int = integer.accumulators(enc_logits)
    report.update({
        "n_executed": n,
        "n_encrypted": n,
        "encrypted": compute_metrics(task, labels[:n], enc_logits),
        "executed_vs_simulated": {
            "n": n,
            "prediction_equal": int(np.sum(predictions(task, enc_logits) == predictions(task, sim_logits[:n]))),
            "bit_exact": int(np.sum(np.all(enc_int == sim_int[:n], axis=1))),
        },
        "agreement": agreement(task, quant_logits[:n], enc_logits),
        "max_abs_logit_error": float(np.max(np.abs(enc_logits - quant_logits[:n]))),
        "latency_ms": run["latency_ms"],
        "samples_ms": run["samples_ms"],
        "bytes": run["bytes"],
        "logits": logits_block(labels, plain_logits, enc_logits, reference=quant_logits),
    })
    return report


def evaluate_report(artifact: Any, inputs: np.ndarray, labels: np.ndarray, report: dict[str, Any],
                    plain_logits: np.ndarray, progress: bool = True, fhe: str = "simulate",
                    n_execute: int | None = 50) -> dict[str, Any]:
    """The ``evaluate`` hook of ``medhe.he.scheme``: ``medhe evaluate --scheme tfhe`` fills ``report`` with
    ``evaluate_tfhe``'s entries (its own plain side replaces the generic one)."""
    report.update(evaluate_tfhe(artifact, inputs, labels, fhe=fhe, progress=progress, n_execute=n_execute))
    return report
