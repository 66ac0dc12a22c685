"""``medhe bench --scheme paillier``: per-stage latency with and without pooled re-randomisation factors, on real
chest X-ray features.

    MEDHE_DATA=/work/shared/data medhe bench --scheme paillier [--model covid-cxr] [-n 10] [--json out.json]

For each test-split image: the client encrypts its feature vector; the server encrypts it again with phe's raw_encrypt for comparison (no CRT); the server evaluates the head twice on the same
ciphertexts — once with a warm pool (a pooled Enc(0) factor is ready: the request path is the head's
multi-exponentiation and one multiplication) and once with the pool disabled (pool_size=0: the factor is computed
inline, as an empty pool does); the client decrypts both and they must agree exactly. The background refill is
off here so that it cannot overlap the timed calls; the pool is topped up synchronously between requests and the
time per factor is reported separately. Reports medians, p95 and the 1-minute load average.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from medhe.machine import load_average, machine_info
from medhe.stats import summarize


_stats = summarize  # the one statistics helper (medhe.stats): one p95 definition everywhere


class _WarmAndCold:
    """The server as ``run_encrypted`` sees it: each request runs on a warm pool (the reply it returns) and again,
    on the same ciphertexts, with the pool disabled; the pool is topped up before, outside the timed call."""

    def __init__(self, warm: Any, cold: Any) -> None:
        self.warm, self.cold = warm, cold
        self.spec = warm.spec
        self.warm_ms: list[float] = []
        self.cold_ms: list[float] = []
        self.fill_ms: list[float] = []
        self.warm_replies: list[bytes] = []
        self.cold_replies: list[bytes] = []
        self.keys: tuple[Any, Any] | None = None

    def load_keys(self, data: bytes) -> tuple[Any, Any]:
        self.keys = (self.warm.load_keys(data), self.cold.load_keys(data))
        return self.keys

    def infer(self, keys: tuple[Any, Any], ciphertext: bytes) -> bytes:
        t0 = time.perf_counter()
        if keys[0].pool.fill(1):
            self.fill_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        reply = self.warm.infer(keys[0], ciphertext)
        t1 = time.perf_counter()
        self.cold_replies.append(self.cold.infer(keys[1], ciphertext))
        self.warm_ms.append((t1 - t0) * 1e3)
        self.cold_ms.append((time.perf_counter() - t1) * 1e3)
        self.warm_replies.append(reply)
        return reply


def run_paillier_benchmark(model: str = "covid-cxr", images: int = 10, key_bits: int | None = None,
                           data_dir: str | None = None) -> dict:
    """Per-stage latencies through the shared loop (``medhe.he.evaluate.run_encrypted``), warm vs empty pool."""
    import torch

    from medhe.data import load_dataset, resolve_data_dir
    from medhe.he import client_for
    from medhe.he.evaluate import run_encrypted
    from medhe.he.paillier import compile_paillier, encoding
    from medhe.models.artifact import load_artifact

    art = load_artifact(model)
    ds = load_dataset(resolve_data_dir(data_dir) / art.card["dataset"]["name"], split="test", channels=1)
    with torch.no_grad():
        feats = art.client_model(torch.from_numpy(art.preprocess().batch(ds.images[:images]))).double().numpy()
    load = [load_average()]
    warm_server = compile_paillier(art, key_bits=key_bits)
    warm_server.pool_background = False  # filled synchronously in _WarmAndCold.infer, never during a timed call
    cold_server = compile_paillier(art, key_bits=key_bits, pool_size=0)
    both = _WarmAndCold(warm_server, cold_server)
    client = client_for(warm_server.spec())
    run = run_encrypted(both, feats, progress=False, client=client,
                        on_image=lambda _run: load.append(load_average()))
    for i, image in enumerate(run["images"]):
        if both.warm_replies[i] == both.cold_replies[i] or not np.array_equal(
                image.logits, client.decrypt(both.cold_replies[i])):
            raise AssertionError("pooled and inline re-randomisation must give different ciphertexts, equal scores")
    warm_keys, cold_keys = both.keys
    assert warm_keys.pool.misses == 0 and cold_keys.pool.hits == 0
    pk = client._keys()[0]
    enc_phe = []
    for x in feats:  # the same residues with phe's raw_encrypt (r^n mod n^2 without the CRT), for comparison
        t0 = time.perf_counter()
        [pk.raw_encrypt(encoding.to_residue(v, pk.n)) for v in encoding.encode(x, warm_server.feature_bits)]
        enc_phe.append((time.perf_counter() - t0) * 1e3)
    return {
        "model": model, "images": len(feats), "key_bits": warm_keys.n.bit_length(), "features": int(feats.shape[1]),
        "keygen_ms": round(run["keys"]["generate_ms"], 1),
        "client_encrypt_ms": _stats(r.encrypt_ms for r in run["images"]),
        "client_encrypt_ms_phe_raw_encrypt": _stats(enc_phe),
        "server_eval_ms_warm_pool": _stats(both.warm_ms),
        "server_eval_ms_empty_pool": _stats(both.cold_ms),
        "pool_factor_ms": _stats(both.fill_ms) if both.fill_ms else None,
        "client_decrypt_ms": _stats(r.decrypt_ms for r in run["images"]),
        "bytes": run["bytes"],
        "load_average_1min": {"min": round(min(load), 2), "max": round(max(load), 2)},
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
