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

import numpy as np

from medhe.machine import load_average, machine_info
from medhe.stats import summarize


_stats = summarize  # the one statistics helper (medhe.stats): one p95 definition everywhere


def run_paillier_benchmark(model: str = "covid-cxr", images: int = 10, key_bits: int | None = None,
                           data_dir: str | None = None) -> dict:
    import torch

    from medhe.data import load_dataset, resolve_data_dir
    from medhe.he import client_for
    from medhe.he.paillier import compile_paillier
    from medhe.models.artifact import load_artifact

    art = load_artifact(model)
    ds = load_dataset(resolve_data_dir(data_dir) / art.card["dataset"]["name"], split="test", channels=1)
    with torch.no_grad():
        feats = art.client_model(torch.from_numpy(art.preprocess().batch(ds.images[:images]))).double().numpy()
    load = [load_average()]
    warm_server = compile_paillier(art, key_bits=key_bits)
    warm_server.pool_background = False  # filled synchronously below, never during a timed call
    cold_server = compile_paillier(art, key_bits=key_bits, pool_size=0)
    client = client_for(warm_server.spec())
    t0 = time.perf_counter()
    client.keygen()
    keygen_ms = (time.perf_counter() - t0) * 1e3
    ek = client.evaluation_keys()
    warm_keys, cold_keys = warm_server.load_keys(ek), cold_server.load_keys(ek)
    from medhe.he.paillier import encoding

    pk = client._keys()[0]
    enc, enc_phe, warm, cold, dec, fill = [], [], [], [], [], []
    for x in feats:
        t0 = time.perf_counter()
        ct = client.encrypt(x)
        enc.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()  # the same residues with phe's raw_encrypt (r^n mod n^2 without the CRT)
        [pk.raw_encrypt(encoding.to_residue(v, pk.n)) for v in encoding.encode(x, warm_server.feature_bits)]
        enc_phe.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        added = warm_keys.pool.fill(1)
        if added:
            fill.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        r_warm = warm_server.infer(warm_keys, ct)
        warm.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        r_cold = cold_server.infer(cold_keys, ct)
        cold.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        s_warm = client.decrypt(r_warm)
        dec.append((time.perf_counter() - t0) * 1e3)
        s_cold = client.decrypt(r_cold)
        if r_warm == r_cold or not np.array_equal(s_warm, s_cold):
            raise AssertionError("pooled and inline re-randomisation must give different ciphertexts, equal scores")
        load.append(load_average())
    assert warm_keys.pool.misses == 0 and cold_keys.pool.hits == 0
    return {
        "model": model, "images": len(feats), "key_bits": warm_keys.n.bit_length(), "features": int(feats.shape[1]),
        "keygen_ms": round(keygen_ms, 1),
        "client_encrypt_ms": _stats(enc),
        "client_encrypt_ms_phe_raw_encrypt": _stats(enc_phe),
        "server_eval_ms_warm_pool": _stats(warm),
        "server_eval_ms_empty_pool": _stats(cold),
        "pool_factor_ms": _stats(fill) if fill else None,
        "client_decrypt_ms": _stats(dec),
        "bytes": {"input_ciphertext": len(ct), "output_ciphertext": len(r_warm), "evaluation_keys": len(ek)},
        "load_average_1min": {"min": round(min(load), 2), "max": round(max(load), 2)},
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
