"""Plain-vs-encrypted evaluation of any scheme through the ``ServerModel``/``ClientSession`` interface.

The driver plays both roles in one process but keeps them honest: the server object only ever receives the
evaluation keys and ciphertext bytes the client produced, exactly as they would cross the network, and everything
it reports (latency per stage, bytes on the wire) is measured on those bytes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
from tqdm import tqdm

from medhe.he.report import logits_block
from medhe.he.scheme import client_for, compile_model
from medhe.models.metrics import compute_metrics, predictions
from medhe.progress import busy
from medhe.stats import summarize

_stats = summarize  # the one statistics helper (medhe.stats); old name kept for importers


def agreement(task: str, plain_logits: np.ndarray, enc_logits: np.ndarray) -> float:
    """Share of identical decisions (per label for multi-label tasks)."""
    return float(np.mean(predictions(task, plain_logits) == predictions(task, enc_logits)))


@dataclass
class ImageRun:
    """One image through encrypt -> server -> decrypt: what a per-image hook sees (times in ms)."""

    index: int
    logits: np.ndarray
    encrypt_ms: float
    eval_ms: float
    eval_cpu_ms: float  # this process's CPU time during the server call (all threads): robust to other jobs
    decrypt_ms: float
    input_bytes: int
    output_bytes: int


def against_plain(task: str, labels: np.ndarray, plain_logits: np.ndarray, enc_logits: np.ndarray,
                  run: dict[str, Any]) -> dict[str, Any]:
    """The report fields every encrypted run of the float model shares (the one schema, docs/reports.md)."""
    return {
        "encrypted": compute_metrics(task, labels, enc_logits),
        "n_encrypted": int(len(enc_logits)),
        "reference": "plain",  # the scheme computes the float model itself
        "agreement": agreement(task, plain_logits, enc_logits),
        "max_abs_logit_error": float(np.max(np.abs(enc_logits - plain_logits))),
        "latency_ms": run["latency_ms"],
        "samples_ms": run["samples_ms"],
        "logits": logits_block(labels, plain_logits, enc_logits),
    }


def run_encrypted(server: Any, inputs: np.ndarray, progress: bool = True, desc: str = "encrypted inference",
                  on_image: Callable[[ImageRun], None] | None = None,
                  stage: Callable[[str], ContextManager[Any]] | None = None,
                  on_keys: Callable[[dict[str, Any]], None] | None = None,
                  client: Any = None) -> dict[str, Any]:
    """Key generation once, then encrypt -> infer -> decrypt per input; returns logits, timings and sizes.

    The one loop every report uses (evaluation, benchmarks, experiments). ``on_image`` sees each image's
    ``ImageRun`` as soon as it is done (logs, checkpoints of long runs); ``stage(name)`` wraps the slow stages
    ("key generation", "image i/n: server eval"), e.g. to print heartbeats. ``keys`` in the result splits the key
    stage into generation, serialization and the server's load (``on_keys`` gets it before the first image);
    ``images`` holds every ``ImageRun``. ``client``: a prepared client session (default: a fresh one for the
    server's spec; an encrypted model needs the key holder's, whose "key generation" loads its secret key; a caller
    that decrypts replies of its own afterwards passes its session too).
    """
    if stage is None:  # key generation takes seconds to minutes: show it ticking (image stages have the bar)
        def stage(name: str) -> ContextManager[Any]:
            return busy(name, progress) if name == "key generation" else nullcontext()
    client = client if client is not None else client_for(server.spec())
    t0, c0 = time.perf_counter(), time.process_time()
    with stage("key generation"):
        client.keygen()
    t1, c1 = time.perf_counter(), time.process_time()
    eval_keys = client.evaluation_keys()
    t2 = time.perf_counter()
    keys = server.load_keys(eval_keys)
    t3 = time.perf_counter()
    key_info = {"evaluation_keys": len(eval_keys), "generate_ms": (t1 - t0) * 1e3, "generate_cpu_ms": (c1 - c0) * 1e3,
                "serialize_ms": (t2 - t1) * 1e3, "server_load_ms": (t3 - t2) * 1e3}
    del eval_keys  # up to a GB serialized (latent models): the loaded keys are all the loop needs
    if on_keys is not None:
        on_keys(key_info)
    runs: list[ImageRun] = []
    for i, x in enumerate(tqdm(inputs, desc=desc, unit="img", disable=not progress, leave=False)):
        t_enc = time.perf_counter()
        ct = client.encrypt(np.asarray(x, dtype=np.float32))
        t_eval, c_eval = time.perf_counter(), time.process_time()
        with stage(f"image {i + 1}/{len(inputs)}: server eval"):
            out = server.infer(keys, ct)
        t_dec, c_dec = time.perf_counter(), time.process_time()
        logits = np.asarray(client.decrypt(out), dtype=np.float64)
        t_end = time.perf_counter()
        run = ImageRun(i, logits, (t_eval - t_enc) * 1e3, (t_dec - t_eval) * 1e3, (c_dec - c_eval) * 1e3,
                       (t_end - t_dec) * 1e3, len(ct), len(out))
        runs.append(run)
        if on_image is not None:
            on_image(run)
    return {
        "logits": np.stack([r.logits for r in runs]),
        "latency_ms": {"keygen": summarize([(t2 - t0) * 1e3]), "encrypt": summarize([r.encrypt_ms for r in runs]),
                       "eval": summarize([r.eval_ms for r in runs]),
                       "decrypt": summarize([r.decrypt_ms for r in runs])},
        "samples_ms": {stage: [round(getattr(r, f"{stage}_ms"), 3) for r in runs]
                       for stage in ("encrypt", "eval", "decrypt")},
        "bytes": {"input_ciphertext": int(np.median([r.input_bytes for r in runs])),
                  "output_ciphertext": int(np.median([r.output_bytes for r in runs])),
                  "evaluation_keys": key_info["evaluation_keys"]},
        "keys": key_info,
        "images": runs,
    }


def evaluate_encrypted(artifact: Any, scheme: str, inputs: np.ndarray, labels: np.ndarray,
                       report: dict[str, Any], plain_logits: np.ndarray, progress: bool = True,
                       compile_options: dict[str, Any] | None = None,
                       on_server: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Fill ``report`` (the shared JSON document) with the encrypted side for ``scheme``."""
    with busy(f"compiling {artifact.name} for {scheme}", progress):
        server = compile_model(artifact, scheme, **(compile_options or {}))
    if on_server is not None:
        on_server(server)
    run = run_encrypted(server, inputs, progress=progress, desc=f"{scheme} inference")
    enc_logits = run["logits"]
    spec = server.spec()
    report.update({
        **against_plain(artifact.task, labels, plain_logits, enc_logits, run),
        "bytes": run["bytes"],
        "params": {**spec.get("params", {}), **server.report_params()},
    })
    return report
