"""Slot-batched CKKS: one image per slot (4096 per ciphertext at N=8192), no rotations, medhe's own kernel.

    server = compile_ckks_batch(artifact)              # CKKSBatchServer: batch plan + compiled kernels
    client = CKKSBatchClient(server.spec()); client.keygen()
    keys = server.load_keys(client.evaluation_keys())  # relinearization keys only
    results = [server.infer_batch(keys, b) for b in client.encrypt_batch(images)]
    logits = client.decrypt_batch(results, len(images))   # (n, outputs)

Modules: ``compiler`` (batch plans), ``runtime`` (segments in the ``_batch`` kernel, boundaries in SEAL), ``rns``
(SEAL ciphertexts <-> RNS arrays), ``server``, ``client``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile_ckks_batch", "CKKSBatchServer", "CKKSBatchClient", "compile_batch_plan"]

_LAZY = {
    "compile_ckks_batch": "medhe.he.ckks.batch.server",
    "CKKSBatchServer": "medhe.he.ckks.batch.server",
    "CKKSBatchClient": "medhe.he.ckks.batch.client",
    "compile_batch_plan": "medhe.he.ckks.batch.compiler",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medhe.he.ckks.batch' has no attribute {name!r}")
