"""Measure one compiled CKKS model on real images: agreement with plaintext, logit error, timings, sizes.

Returns a JSON-able dict, so benchmarks and reports read the same figures. Server time is split into input
deserialization (``load_ms``) and evaluation proper (``eval_ms``); client time is encryption (layout, encode,
encrypt, compact serialization) plus decryption. Timings are medians (and minima) over all images, because the
machines we share are noisy; ``*_cpu_ms`` are this process's CPU seconds (what the work costs without waiting for
a core on a busy machine).

    python -m medhe.he.ckks.measure pneumoniamnist --limit 50 --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from medhe.he.ckks.wire import envelope
from medhe.he.ckks.client import CKKSClient
from medhe.he.ckks.server import CKKSServerModel


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def measure(server: CKKSServerModel, images: np.ndarray, reference_logits: np.ndarray,
            progress: bool = False) -> dict[str, Any]:
    """Encrypt, evaluate and decrypt every image; compare with ``reference_logits`` (plaintext, same model)."""
    client = CKKSClient(server.spec())
    t = time.perf_counter()
    client.keygen()
    keygen_s = time.perf_counter() - t
    key_bytes = client.evaluation_keys()
    keys = server.load_keys(key_bytes)
    timings: dict[str, list[float]] = {"encrypt_ms": [], "load_ms": [], "eval_ms": [], "decrypt_ms": [],
                                       "eval_cpu_ms": [], "encrypt_cpu_ms": []}
    errors, agree, sizes = [], [], {}
    for i, (x, want) in enumerate(zip(images, reference_logits)):
        t0, c0 = time.perf_counter(), time.process_time()
        ct = client.encrypt(x)
        t1, c1 = time.perf_counter(), time.process_time()
        cts = server.load_inputs(ct)
        t2, c2 = time.perf_counter(), time.process_time()
        out_ct = server.evaluate(keys, cts)
        t3, c3 = time.perf_counter(), time.process_time()
        out = envelope.pack(envelope.KIND_OUTPUT, server.plan_id, [server.backend.serialize(out_ct)])
        t4 = time.perf_counter()
        got = client.decrypt(out)
        t5 = time.perf_counter()
        for key, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, c3 - c2, c1 - c0)):
            timings[key].append(1e3 * dt)
        errors.append(float(np.abs(got - want).max()))
        agree.append(bool(np.argmax(got) == np.argmax(want)) if len(want) > 1 else bool((got > 0) == (want > 0)))
        sizes = {"input_bytes": len(ct), "output_bytes": len(out), "evaluation_key_bytes": len(key_bytes)}
        if progress and (i + 1) % 25 == 0:
            print(f"{i + 1}/{len(images)} images, max |logit error| so far {max(errors):.2e}", file=sys.stderr)
    client_ms = [a + b for a, b in zip(timings["encrypt_ms"], timings["decrypt_ms"])]
    return {"images": len(errors), "agreement": float(np.mean(agree)), "max_abs_logit_error": max(errors),
            "mean_abs_logit_error": float(np.mean(errors)),
            **{k: _stats(v) for k, v in timings.items()}, "client_ms": _stats(client_ms),
            "keygen_s": keygen_s, **sizes, "plan": server.plan.summary()}


def main(argv: list[str] | None = None) -> int:
    from medhe.he.ckks.server import compile_ckks
    from medhe.models.artifact import load_artifact

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory or shipped model name")
    parser.add_argument("--data", default=None, help="MedMNIST .npz file (default: MEDHE_DATA/<dataset>.npz)")
    parser.add_argument("--limit", type=int, default=0, help="first N test images (0: all)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    import os
    from pathlib import Path

    from medhe import atomic

    art = load_artifact(args.model)
    data = args.data or str(Path(os.environ.get("MEDHE_DATA", "~/.medhe/data")).expanduser()
                            / f"{art.card['dataset']['name']}.npz")
    with np.load(data) as d:
        raw = d["test_images"]
    raw = raw[: args.limit] if args.limit else raw
    pre = art.card["preprocessing"]
    x = raw.astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    x = (x - float(pre.get("mean", 0.0))) / float(pre.get("std", 1.0))
    t = time.perf_counter()
    server = compile_ckks(art)
    compile_s = time.perf_counter() - t
    with torch.no_grad():
        ref = art.model(torch.from_numpy(x)).double().numpy()
    report = {"model": art.name, "data": data, "compile_s": compile_s, **measure(server, x, ref, progress=True)}
    text = json.dumps(report, indent=1)
    if args.out:
        atomic.write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
