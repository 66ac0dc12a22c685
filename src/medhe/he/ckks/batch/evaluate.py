"""Whole dataset splits through batch mode, with the client and server roles kept apart as in
``medhe.he.evaluate``: the server only sees the key and ciphertext bytes the client produced."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm import tqdm

from medhe.he.ckks.batch.client import CKKSBatchClient
from medhe.he.ckks.batch.server import CKKSBatchServer, compile_ckks_batch
from medhe.he.security import MAX_MODULUS_BITS_128, security_bits
from medhe.stats import summarize


def security(params: Any) -> dict[str, Any]:
    """What the security claim rests on: ring degree and total modulus against the HomomorphicEncryption.org table
    (``security_bits`` raises below 128 bits)."""
    return {"bits": security_bits(params.poly_degree, params.prime_bits), "poly_degree": params.poly_degree,
            "modulus_bits": int(sum(params.prime_bits)), "max_modulus_bits_128": MAX_MODULUS_BITS_128[params.poly_degree]}


def run_batch_encrypted(server: CKKSBatchServer, inputs: np.ndarray, progress: bool = True) -> dict[str, Any]:
    """Key generation once, then encrypt -> infer -> decrypt per ciphertext batch; logits, timings, sizes."""
    client = CKKSBatchClient(server.spec())
    t0 = time.perf_counter()
    client.keygen()
    eval_keys = client.evaluation_keys()
    t1 = time.perf_counter()
    keys = server.load_keys(eval_keys)
    n = len(inputs)
    stages = {"encrypt_s": 0.0, "server_load_s": 0.0, "server_eval_s": 0.0, "server_dump_s": 0.0, "decrypt_s": 0.0}
    samples: dict[str, list[float]] = {"encrypt": [], "eval": [], "decrypt": []}  # ms per ciphertext batch
    timings: dict[str, float] = {}
    ups, downs = [], []
    results = []
    batches = client.batches(n)
    for k in tqdm(range(batches), desc="ckks batch inference", unit="batch", disable=not progress, leave=False):
        block = inputs[k * client.batch:(k + 1) * client.batch]
        ta = time.perf_counter()
        data = client.encrypt_batch(block)[0]
        tb = time.perf_counter()
        arr = server.load_inputs(data)
        tc = time.perf_counter()
        out = server.evaluate(keys, arr, timings)
        td = time.perf_counter()
        result = server.dump_outputs(out)
        te = time.perf_counter()
        results.append(client.decrypt_one(result)[: len(block)])
        tf = time.perf_counter()
        for key, dt in zip(stages, (tb - ta, tc - tb, td - tc, te - td, tf - te)):
            stages[key] += dt
        # the shared stages (medhe-report/1): the server's whole turn (load, evaluate, dump) is "eval"
        for stage, dt in (("encrypt", tb - ta), ("eval", te - tb), ("decrypt", tf - te)):
            samples[stage].append(round(dt * 1e3, 3))
        ups.append(len(data))
        downs.append(len(result))
    logits = np.concatenate(results, axis=0)
    up, down = sum(ups), sum(downs)
    per = 1e3 / n
    return {
        "logits": logits,
        "batch": {"size": client.batch, "batches": batches, "images": n},
        # one sample per ciphertext batch (each holds up to batch-size images); per-image figures in batch_ms
        "latency_ms": {"keygen": summarize([(t1 - t0) * 1e3]),
                       **{stage: summarize(values) for stage, values in samples.items()}},
        "samples_ms": samples,
        "batch_ms": {**{f"{k[:-2]}_per_image": round(v * per, 4) for k, v in stages.items()},
                     "server_eval_per_batch": round(stages["server_eval_s"] * 1e3 / batches, 1),
                     "kernel_per_batch": round(timings.get("kernel_s", 0.0) * 1e3 / batches, 1),
                     "boundary_per_batch": round(timings.get("boundary_s", 0.0) * 1e3 / batches, 1)},
        # input/output_ciphertext: median bytes of one batch's message (shared fields); the rest batch mode's own
        "bytes": {"input_ciphertext": int(np.median(ups)), "output_ciphertext": int(np.median(downs)),
                  "evaluation_keys": len(eval_keys),
                  "input_per_batch": up // batches, "output_per_batch": down // batches,
                  "input_per_image": up / n, "output_per_image": down / n,
                  # a full batch spreads the same bytes over batch-size images (the last batch here is padded)
                  "input_per_slot": up / (batches * client.batch), "output_per_slot": down / (batches * client.batch)},
    }


def evaluate_batch(artifact: Any, inputs: np.ndarray, labels: np.ndarray, report: dict[str, Any],
                   plain_logits: np.ndarray, progress: bool = True) -> dict[str, Any]:
    """Fill ``report`` with the batch-mode encrypted side (same keys as ``evaluate_encrypted`` plus batch info)."""
    from medhe.he.evaluate import against_plain

    server = compile_ckks_batch(artifact)
    run = run_batch_encrypted(server, inputs, progress)
    enc = run["logits"]
    report.update({
        "mode": "batch",
        **against_plain(artifact.task, labels, plain_logits, enc, run),
        "batch_ms": run["batch_ms"],
        "bytes": run["bytes"],
        "batch": run["batch"],
        "params": {**server.plan.params.to_dict(), **server.report_params()},
        "plan": server.plan.summary(),
        "security": security(server.plan.params),
    })
    return report
