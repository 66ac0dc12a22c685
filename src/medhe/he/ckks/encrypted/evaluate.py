"""``medhe evaluate --encrypted-model``: the encrypted-weight plan beside the plaintext-weight plan, one report.

The key holder runs this (it has the plaintext model for the reference logits, the KEYDIR and the ENCDIR); the
server object is loaded from the ENCDIR alone, exactly as ``medhe serve --encrypted-model`` loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medhe.errors import MedheError
from medhe.he.ckks.encrypted.client import KeyHolderClient
from medhe.he.ckks.encrypted.keys import load_keydir
from medhe.he.ckks.encrypted.model import WEIGHTS_FILE, load_encrypted_model
from medhe.he.evaluate import against_plain, evaluate_encrypted, run_encrypted


def evaluate_encrypted_model(artifact: Any, encdir: str | os.PathLike, keydir: str | os.PathLike,
                             inputs: np.ndarray, labels: np.ndarray, report: dict[str, Any],
                             plain_logits: np.ndarray, progress: bool = True) -> dict[str, Any]:
    """Fill ``report`` with the encrypted-weight run (top level) and the plaintext-weight run
    (``plaintext_weights``) on the same inputs."""
    keys = load_keydir(keydir)
    server = load_encrypted_model(encdir)
    spec = server.spec()
    client = KeyHolderClient(spec, keys, where=f"the encrypted model in {encdir}")
    if artifact.card.get("name") != spec.get("model"):
        raise MedheError(f"{encdir} holds model {spec.get('model')!r}, not {artifact.card.get('name')!r}: pass the "
                         "--model that medhe encrypt-model encrypted")
    baseline: dict[str, Any] = {}
    # the same plan (same parameters and layout) with plaintext weights: what encrypting the weights costs
    evaluate_encrypted(artifact, "ckks", inputs, labels, baseline, plain_logits, progress=progress,
                       compile_options=keys.compile_options)
    if baseline["params"].get("poly_degree") != spec["params"]["poly_degree"]:  # pragma: no cover - same options
        raise MedheError(f"{keydir} records compile options that no longer give the encrypted plan")
    run = run_encrypted(server, inputs, progress=progress, desc="ckks inference, encrypted weights", client=client)
    logits = run["logits"]
    enc = spec["encrypted_model"]
    bytes_ = dict(run["bytes"])
    bytes_["encrypted_model"] = (Path(encdir) / WEIGHTS_FILE).stat().st_size
    report.update({
        "mode": "encrypted-model",
        **against_plain(artifact.task, labels, plain_logits, logits, run),  # plaintext_weights: same plan, plain
        "bytes": bytes_,
        "params": {**spec.get("params", {}), **server.report_params()},
        "encrypted_model": {k: v for k, v in enc.items() if k != "format"},
        "plaintext_weights": {k: baseline[k] for k in ("encrypted", "agreement", "max_abs_logit_error",
                                                       "latency_ms", "bytes", "params")},
    })
    return report
