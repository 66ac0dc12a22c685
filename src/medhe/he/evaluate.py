"""Plain-vs-encrypted evaluation of any scheme through the ``ServerModel``/``ClientSession`` interface.

The driver plays both roles in one process but keeps them honest: the server object only ever receives the
evaluation keys and ciphertext bytes the client produced, exactly as they would cross the network, and everything
it reports (latency per stage, bytes on the wire) is measured on those bytes.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from medhe.he.scheme import client_for, compile_model
from medhe.models.metrics import compute_metrics, predictions


def _stats(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms, dtype=float)
    return {"median": round(float(np.median(arr)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "mean": round(float(arr.mean()), 3)}


def agreement(task: str, plain_logits: np.ndarray, enc_logits: np.ndarray) -> float:
    """Share of identical decisions (per label for multi-label tasks)."""
    return float(np.mean(predictions(task, plain_logits) == predictions(task, enc_logits)))


def run_encrypted(server: Any, inputs: np.ndarray, progress: bool = True,
                  desc: str = "encrypted inference") -> dict[str, Any]:
    """Key generation once, then encrypt -> infer -> decrypt per input; returns logits, timings and sizes."""
    client = client_for(server.spec())
    t0 = time.perf_counter()
    client.keygen()
    eval_keys = client.evaluation_keys()
    keygen_ms = (time.perf_counter() - t0) * 1e3
    keys = server.load_keys(eval_keys)
    key_bytes = len(eval_keys)
    del eval_keys  # up to a GB serialized (latent models): the loaded keys are all the loop needs
    enc_ms, eval_ms, dec_ms, in_bytes, out_bytes, logits = [], [], [], [], [], []
    for x in tqdm(inputs, desc=desc, unit="img", disable=not progress, leave=False):
        t0 = time.perf_counter()
        ct = client.encrypt(np.asarray(x, dtype=np.float32))
        t1 = time.perf_counter()
        out = server.infer(keys, ct)
        t2 = time.perf_counter()
        logits.append(np.asarray(client.decrypt(out), dtype=np.float64))
        t3 = time.perf_counter()
        enc_ms.append((t1 - t0) * 1e3)
        eval_ms.append((t2 - t1) * 1e3)
        dec_ms.append((t3 - t2) * 1e3)
        in_bytes.append(len(ct))
        out_bytes.append(len(out))
    return {
        "logits": np.stack(logits),
        "latency_ms": {"keygen": round(keygen_ms, 3), "encrypt": _stats(enc_ms), "eval": _stats(eval_ms),
                       "decrypt": _stats(dec_ms)},
        "bytes": {"input_ciphertext": int(np.median(in_bytes)), "output_ciphertext": int(np.median(out_bytes)),
                  "evaluation_keys": key_bytes},
    }


def evaluate_encrypted(artifact: Any, scheme: str, inputs: np.ndarray, labels: np.ndarray,
                       report: dict[str, Any], plain_logits: np.ndarray, progress: bool = True,
                       compile_options: dict[str, Any] | None = None,
                       on_server: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Fill ``report`` (the shared JSON document) with the encrypted side for ``scheme``."""
    server = compile_model(artifact, scheme, **(compile_options or {}))
    if on_server is not None:
        on_server(server)
    run = run_encrypted(server, inputs, progress=progress, desc=f"{scheme} inference")
    enc_logits = run["logits"]
    spec = server.spec()
    report.update({
        "encrypted": compute_metrics(artifact.task, labels, enc_logits),
        "agreement": agreement(artifact.task, plain_logits, enc_logits),
        "max_abs_logit_error": float(np.max(np.abs(enc_logits - plain_logits))),
        "latency_ms": run["latency_ms"],
        "bytes": run["bytes"],
        "params": spec.get("params", {}),
    })
    return report
