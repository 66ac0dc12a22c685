"""Per-operation costs, native runtime vs seal-python side by side, idle and with the other core busy.

Rotation at every level (SEAL, native exact, native hoisted per rotation out of 8, a 4-term rotate-and-sum),
multiply_plain, rescale, relinearize; native on both kernel sets. "Busy" runs a bounded pure-Python spin loop in a
child process beside the measurement (what a second request or another tenant does to a 2-core server).
Medians over ``repeats`` calls, in milliseconds; ``program_*``: the whole default plan, seal vs native with adaptive,
one and two threads.

    medhe bench --scheme ckks --ops [--json ops.json]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

HOIST = [1, 2, 4, 8, 16, 32, 64, 128]


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm caches and tables
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * float(np.median(times)), 3)


def _table(nb, repeats: int) -> dict[str, Any]:
    from medhe.he.ckks import _runtime

    sb, ev = nb.seal, nb.seal.evaluator
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    isas = ["portable"] + (["ifma"] if _runtime.ifma_available() else [])
    for level in range(nb.top, -1, -1):
        scale = 2.0 ** min(nb.params.scale_bits, (nb.params.prime_bits[0] - 2) // 2 if level == 0 else 60)
        x = rng.uniform(-1, 1, nb.slots)
        sx = sb.encrypt(sb.encode(x, level, scale))
        sy = sb.encrypt(sb.encode(x[::-1].copy(), level, scale))
        px = sb.encode(x, level, scale)
        nx, ny, pn = nb.from_seal(sx), nb.from_seal(sy), nb.plain_from_seal(px, level)
        s3, n3 = ev.multiply(sx, sy), nb.multiply(nx, ny)
        four_s = [sx, sy, sx, sy]
        four_n = [nx, ny, nx, ny]

        def seal_sum():
            acc = sx
            for c, s in zip(four_s[1:], (1, 2, 4)):
                acc = ev.add(acc, sb.rotate(c, s))
            return acc

        row: dict[str, Any] = {
            "seal": {"rotate": _median_ms(lambda: sb.rotate(sx, 1), repeats),
                     "rotate_x8": _median_ms(lambda: [sb.rotate(sx, s) for s in HOIST], repeats),
                     "rotate_sum4": _median_ms(seal_sum, repeats),
                     "multiply_plain": _median_ms(lambda: ev.multiply_plain(sx, px), repeats),
                     "relinearize": _median_ms(lambda: sb.relinearize(s3), repeats)}}
        if level:
            row["seal"]["rescale"] = _median_ms(lambda: ev.rescale_to_next(sx), repeats)
        for isa in isas:
            _runtime.set_isa(isa)
            r = {"rotate": _median_ms(lambda: nb.rotate(nx, 1), repeats),
                 "rotate_x8": _median_ms(lambda: [nb.rotate(nx, s) for s in HOIST], repeats),
                 "rotate_x8_hoisted": _median_ms(lambda: nb.rotate_hoisted(nx, HOIST), repeats),
                 "rotate_sum4": _median_ms(lambda: nb.ctx.rotate_sum(four_n, [0, 1, 2, 4], nb.keys), repeats),
                 "multiply_plain": _median_ms(lambda: nb.multiply_plain(nx, pn), repeats),
                 "relinearize": _median_ms(lambda: nb.relinearize(n3), repeats)}
            r["rotate_hoisted_each"] = round(r["rotate_x8_hoisted"] / len(HOIST), 3)
            if level:
                r["rescale"] = _median_ms(lambda: nb.rescale(nx), repeats)
            row[f"native_{isa}"] = r
        _runtime.set_isa("auto")
        best = row[f"native_{isas[-1]}"]
        row["speedup"] = {k: round(row["seal"][k] / best[k], 2) for k in row["seal"] if best.get(k)}
        out[str(level)] = row
    return out


def _busy(seconds: float) -> subprocess.Popen:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _program_costs(model: str, repeats: int) -> dict[str, Any]:
    """The whole plan of ``model``: seal backend vs native (adaptive threads, and fixed at 1 and 2)."""
    import json

    from medhe.he import client_for
    from medhe.he.ckks import _runtime
    from medhe.he.ckks.server import compile_ckks
    from medhe.models.artifact import load_artifact

    art = load_artifact(model)
    seal_srv, nat_srv = compile_ckks(art, backend="seal"), compile_ckks(art, backend="native")
    client = client_for(json.loads(json.dumps(seal_srv.spec())))
    client.keygen()
    key_bytes = client.evaluation_keys()
    ks, kn = seal_srv.load_keys(key_bytes), nat_srv.load_keys(key_bytes)
    x = np.zeros(seal_srv.plan.input_shape, dtype=np.float32)
    ct = client.encrypt(x)
    s_in, n_in = seal_srv.load_inputs(ct), nat_srv.load_inputs(ct)
    prog = nat_srv._program
    out = {"seal": _median_ms(lambda: seal_srv.evaluate(ks, s_in), repeats),
           "native_adaptive": _median_ms(lambda: nat_srv.evaluate(kn, n_in), 2 * repeats)}
    for count in (1, 2):
        _runtime.set_threads(count)
        out[f"native_threads_{count}"] = _median_ms(lambda: prog.program.run(list(n_in), kn.galois), repeats)
    out["adaptive_choice"] = min(prog.threads.mean, key=prog.threads.mean.get)  # threads it settled on
    return out


def run_op_costs(params=None, repeats: int = 9, busy: bool = True, model: str | None = "pneumoniamnist"
                 ) -> dict[str, Any]:
    """The table for ``params`` (default: the shipped default model's chain), idle and (``busy``) loaded."""
    from medhe.he.ckks import _runtime
    from medhe.he.ckks.backends.native import NativeBackend
    from medhe.he.ckks.compiler.params import CKKSParams

    params = params or CKKSParams(8192, (38, 27, 27, 27, 27, 27, 43), 27)
    nb = NativeBackend(params)
    nb.keygen(HOIST + [0], True)
    result: dict[str, Any] = {"params": params.to_dict(), "threads": _runtime.threads(), "isa": _runtime.isa(),
                              "cpus": os.cpu_count(), "repeats": repeats, "idle": _table(nb, repeats)}
    if model:
        result["program_idle"] = _program_costs(model, repeats)
    if busy:
        spinner = _busy(900)
        try:
            time.sleep(0.2)
            result["other_core_busy"] = _table(nb, repeats)
            if model:
                result["program_other_core_busy"] = _program_costs(model, repeats)
        finally:
            spinner.kill()
            spinner.wait()
    return result
