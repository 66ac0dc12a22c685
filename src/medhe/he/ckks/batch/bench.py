"""``medhe bench --scheme ckks --batch``: batch-mode throughput for one full ciphertext batch of real test images.

Reported next to the single-image path and TenSEAL from the same run (``medhe.he.ckks.bench``), so the ratios
compare numbers taken minutes apart on the same machine. "Server evaluation" is the batch plan's evaluation from
loaded ciphertexts to output ciphertexts (kernel segments + SEAL relinearize/rescale); "with I/O" adds the
server's deserialization of the upload and serialization of the result.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from medhe.errors import DataError


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def run_batch_benchmark(model: str = "pneumoniamnist", data_dir: str | os.PathLike | None = None,
                        repeats: int = 3, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """One full batch (``batch_size`` images: the test split repeated to fill it) through batch mode."""
    from medhe.data.evalsplit import load_eval_data
    from medhe.he.ckks.batch.client import CKKSBatchClient
    from medhe.he.ckks.batch.evaluate import security
    from medhe.he.ckks.batch.server import compile_ckks_batch
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs, predict_logits

    if repeats < 1:
        raise DataError("repeats must be at least 1")
    artifact = load_artifact(model)
    _, ds = load_eval_data(artifact, None, "test", None, str(data_dir) if data_dir else None)
    t0 = time.perf_counter()
    server = compile_ckks_batch(artifact, threads=threads)
    compile_s = time.perf_counter() - t0
    batch = server.batch_size
    x = model_inputs(artifact, ds.images)
    x = x[np.arange(batch) % len(x)]
    plain = predict_logits(artifact.model, x)
    client = CKKSBatchClient(server.spec())
    t0 = time.perf_counter()
    client.keygen()
    keys_bytes = client.evaluation_keys()
    keygen_s = time.perf_counter() - t0
    keys = server.load_keys(keys_bytes)
    t0 = time.perf_counter()
    upload = client.encrypt_batch(x)[0]
    encrypt_s = time.perf_counter() - t0
    if progress:
        print(f"batch of {batch}: encrypted in {encrypt_s:.1f} s ({len(upload) / 1e6:.0f} MB)", flush=True)
    load_s, eval_s, dump_s, kernel_s, boundary_s, cpu_s = [], [], [], [], [], []
    result = b""
    for r in range(repeats):
        ta = time.perf_counter()
        arr = server.load_inputs(upload)
        tb, cb = time.perf_counter(), time.process_time()
        timings: dict[str, float] = {}
        out = server.evaluate(keys, arr, timings)
        tc, cc = time.perf_counter(), time.process_time()
        cpu_s.append(cc - cb)
        result = server.dump_outputs(out)
        td = time.perf_counter()
        del arr
        load_s.append(tb - ta)
        eval_s.append(tc - tb)
        dump_s.append(td - tc)
        kernel_s.append(timings["kernel_s"])
        boundary_s.append(timings["boundary_s"])
        if progress:
            print(f"  run {r + 1}/{repeats}: load {tb - ta:.2f} s, evaluate {tc - tb:.2f} s "
                  f"({batch / (tc - tb):.0f} images/s), dump {td - tc:.3f} s", flush=True)
    t0 = time.perf_counter()
    logits = client.decrypt_batch([result], batch)
    decrypt_s = time.perf_counter() - t0
    ev, io = _median(eval_s), _median(eval_s) + _median(load_s) + _median(dump_s)
    return {
        "model": artifact.name,
        "batch_size": batch,
        "images_per_s": round(batch / ev, 1),
        "images_per_s_with_io": round(batch / io, 1),
        # CPU seconds of this process during evaluation (all threads): robust to other jobs on a shared machine;
        # batch / (cpu / cores) is what the cores would give if the evaluation had them to itself
        "evaluate_cpu_s": round(_median(cpu_s), 3),
        "images_per_s_from_cpu_time": round(batch * (os.cpu_count() or 1) / _median(cpu_s), 1),
        "threads": server.threads or os.cpu_count(),
        "repeats": repeats,
        "server_s": {"evaluate": round(ev, 3), "kernel": round(_median(kernel_s), 3),
                     "relinearize_rescale": round(_median(boundary_s), 3), "load_input": round(_median(load_s), 3),
                     "dump_output": round(_median(dump_s), 3), "evaluate_runs": [round(v, 3) for v in eval_s]},
        "client_ms_per_image": {"encrypt": round(encrypt_s * 1e3 / batch, 4),
                                "decrypt": round(decrypt_s * 1e3 / batch, 4),
                                "keygen_total": round(keygen_s * 1e3, 1)},
        "bytes_per_image": {"up": round(len(upload) / batch, 1), "down": round(len(result) / batch, 1)},
        "bytes_per_batch": {"up": len(upload), "down": len(result)},
        "key_bytes": len(keys_bytes),
        "compile_s": round(compile_s, 2),
        "quality": {"max_abs_logit_error": float(np.max(np.abs(logits - plain))),
                    "argmax_agreement": float(np.mean(logits.argmax(1) == plain.argmax(1)))},
        "plan": server.plan.summary(),
        "security": security(server.plan.params),
    }


def add_comparison(throughput: dict[str, Any], single: dict[str, Any] | None) -> dict[str, Any]:
    """Images/s of the single-image path and TenSEAL (from their median server evaluation) and the ratios."""
    if not single:
        return throughput
    one = single["medhe_default"]["latency_ms"]["eval"]["median"]
    ts = single["tenseal_tutorial4"]["latency_ms"]["eval"]["median"]
    throughput["single_image_images_per_s"] = round(1e3 / one, 2) if one else None
    throughput["tenseal_tutorial4_images_per_s"] = round(1e3 / ts, 2) if ts else None
    throughput["speedup_vs_single_image"] = round(throughput["images_per_s"] * one / 1e3, 1) if one else None
    throughput["speedup_vs_tenseal"] = round(throughput["images_per_s"] * ts / 1e3, 1) if ts else None
    throughput["targets"] = {"images_per_s": 2000.0, "floor": 1000.0}
    return throughput


def format_throughput(t: dict[str, Any]) -> str:
    s = t["server_s"]
    lines = [f"batch mode ({t['model']}, {t['batch_size']} images per ciphertext): server evaluation "
             f"{s['evaluate']:.2f} s -> {t['images_per_s']:.0f} images/s (with load/dump {t['images_per_s_with_io']:.0f}"
             f"/s); kernel {s['kernel']:.2f} s, relinearize+rescale {s['relinearize_rescale']:.2f} s; CPU "
             f"{t['evaluate_cpu_s']:.2f} s -> {t['images_per_s_from_cpu_time']:.0f} images/s on {os.cpu_count()} "
             "otherwise idle cores",
             f"  client per image: encrypt {t['client_ms_per_image']['encrypt']:.2f} ms, decrypt "
             f"{t['client_ms_per_image']['decrypt']:.3f} ms; bytes per image up {t['bytes_per_image']['up']:.0f}, "
             f"down {t['bytes_per_image']['down']:.0f}; keys {t['key_bytes'] / 1e6:.2f} MB; max|logit err| "
             f"{t['quality']['max_abs_logit_error']:.2g}"]
    if t.get("single_image_images_per_s"):
        lines.append(f"  vs single-image path {t['single_image_images_per_s']} images/s ({t['speedup_vs_single_image']}x), "
                     f"vs TenSEAL Tutorial 4 {t['tenseal_tutorial4_images_per_s']} images/s ({t['speedup_vs_tenseal']}x)")
    return "\n".join(lines)
