"""Measure one compiled CKKS model on real images: agreement with plaintext, logit error, timings, sizes.

The images go through the one loop every report uses (``medhe.he.evaluate.run_encrypted``); this module adds what
only CKKS can split: server time into input deserialization (``load_ms``), evaluation proper (``eval_ms``) and
output serialization. Timings are ``medhe.stats`` summaries over all images, because the machines we share are
noisy; ``eval_cpu_ms`` is this process's CPU time (what the work costs without waiting for a core).

    medhe bench --scheme ckks --engine-only --model pneumoniamnist -n 50 --json report.json
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from medhe.he.ckks.server import CKKSServerModel
from medhe.he.ckks.wire import envelope
from medhe.stats import summarize


class _SplitTiming:
    """The server as ``run_encrypted`` sees it, with ``infer`` timed in its three CKKS steps."""

    def __init__(self, server: CKKSServerModel) -> None:
        self.server = server
        self.load_ms: list[float] = []
        self.eval_ms: list[float] = []
        self.spec, self.load_keys = server.spec, server.load_keys

    def infer(self, keys: Any, ciphertext: bytes) -> bytes:
        t0 = time.perf_counter()
        cts = self.server.load_inputs(ciphertext)
        t1 = time.perf_counter()
        out = self.server.evaluate(keys, cts)
        t2 = time.perf_counter()
        self.load_ms.append((t1 - t0) * 1e3)
        self.eval_ms.append((t2 - t1) * 1e3)
        return envelope.pack(envelope.KIND_OUTPUT, self.server.plan_id, [self.server.backend.serialize(out)])


def measure(server: CKKSServerModel, images: np.ndarray, reference_logits: np.ndarray,
            progress: bool = False) -> dict[str, Any]:
    """Encrypt, evaluate and decrypt every image; compare with ``reference_logits`` (plaintext, same model)."""
    from medhe.he.evaluate import run_encrypted

    timed = _SplitTiming(server)
    run = run_encrypted(timed, images, progress=progress, desc="ckks measure")
    got, want = run["logits"], np.asarray(reference_logits, dtype=np.float64)[: len(images)]
    errors = np.max(np.abs(got - want), axis=1)
    agree = got.argmax(1) == want.argmax(1) if want.shape[1] > 1 else (got[:, 0] > 0) == (want[:, 0] > 0)
    runs = run["images"]
    return {"images": len(runs), "agreement": float(np.mean(agree)), "max_abs_logit_error": float(errors.max()),
            "mean_abs_logit_error": float(errors.mean()),
            "encrypt_ms": summarize(r.encrypt_ms for r in runs), "load_ms": summarize(timed.load_ms),
            "eval_ms": summarize(timed.eval_ms), "decrypt_ms": summarize(r.decrypt_ms for r in runs),
            "infer_ms": run["latency_ms"]["eval"], "eval_cpu_ms": summarize(r.eval_cpu_ms for r in runs),
            "client_ms": summarize(r.encrypt_ms + r.decrypt_ms for r in runs),
            "keygen_s": run["latency_ms"]["keygen"]["median"] / 1e3,
            "input_bytes": run["bytes"]["input_ciphertext"], "output_bytes": run["bytes"]["output_ciphertext"],
            "evaluation_key_bytes": run["bytes"]["evaluation_keys"], "plan": server.plan.summary()}


def run_measurement(model: str, n_images: int, data_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``medhe bench --scheme ckks --engine-only``: compile ``model`` and measure it on its first test images."""
    from medhe.data.evalsplit import load_eval_data
    from medhe.he.scheme import compile_model
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs, predict_logits
    from medhe.progress import busy

    art = load_artifact(model)
    dataset, ds = load_eval_data(art, None, "test", n_images, data_dir)
    x = model_inputs(art, ds.images)
    t = time.perf_counter()
    with busy(f"compiling {art.name} for ckks", progress):
        server = compile_model(art, "ckks")
    compile_s = time.perf_counter() - t
    return {"model": art.name, "dataset": dataset, "compile_s": round(compile_s, 3),
            "params": {**server.spec()["params"], **server.report_params()},
            **measure(server, x, predict_logits(art.model, x), progress=progress)}
