"""Runs a batch plan: each segment in medhe's kernel (``_batch``), each boundary (relinearize + rescale of the few
dozen ciphertexts the compiler ends segments on) in medhe's native runtime (``_runtime``) when it is built, else
in seal-python through SEAL's own byte format (``rns``). Both give residues identical to SEAL's.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import seal

from medhe.errors import CiphertextError, PlanError
from medhe.he.ckks.backends.seal import seal_context
from medhe.he.ckks.batch import rns
from medhe.he.ckks.batch.compiler import BatchPlan, MacStep, Poly2Step, Segment
from medhe.he.ckks.compiler.params import data_primes

try:  # optional: a machine without a compiler has no kernel, and batch mode then says so
    from medhe.he.ckks import _batch
except ImportError:  # pragma: no cover - exercised only without the extension
    _batch = None

CHUNK = 64  # coefficients per work item: one chunk of every intermediate tensor stays in L2


def default_threads() -> int:
    return max(1, int(os.environ.get("MEDHE_BATCH_THREADS", "0")) or (os.cpu_count() or 1))


def kernel_available() -> bool:
    return _batch is not None


def build_kernels(plan: BatchPlan) -> list[Any]:
    """One compiled ``_batch.Segment`` per plan segment (weights and constants as residues of its level)."""
    if _batch is None:
        raise PlanError("batch mode needs medhe's C++ kernel (medhe.he.ckks._batch), which is not built here: "
                        "install with a C++ compiler (pip install . or python setup.py build_ext --inplace)")
    primes = data_primes(plan.params)
    out = []
    for seg in plan.segments:
        moduli = primes[: seg.level + 1]
        k = _batch.Segment(moduli, plan.params.poly_degree, [(int(c), int(s)) for c, s in seg.values])
        for st in seg.steps:
            if isinstance(st, MacStep):
                m = st.matrix
                bias = np.array([[b % q for q in moduli] for b in st.bias], dtype=np.uint64) if any(st.bias) \
                    else np.zeros(0, dtype=np.uint64)
                k.add_mac(st.src, st.dst, m.indptr.astype(np.int64), m.indices.astype(np.int64),
                          m.data.astype(np.int64), bias.reshape(-1))
            elif isinstance(st, Poly2Step):
                k.add_poly2(st.src, st.dst, st.sign, rns.residues(st.beta, moduli),
                            rns.residues(st.c, moduli) if st.c else np.zeros(0, dtype=np.uint64))
            else:  # pragma: no cover
                raise PlanError(f"unknown batch step {type(st).__name__}")
        out.append(k)
    return out


class SealBoundary:
    """Relinearize and rescale whole tensors of ciphertexts with SEAL (holds the client's relinearization keys)."""

    def __init__(self, plan: BatchPlan, relin_keys: seal.RelinKeys | None) -> None:
        self.context = seal_context(plan.params)
        self.evaluator = seal.Evaluator(self.context)
        self.relin_keys = relin_keys
        self.version = rns.seal_version(self.context)
        self.parms_ids: dict[int, list[int]] = {}
        data = self.context.first_context_data()
        while data is not None:
            self.parms_ids[data.chain_index()] = data.parms_id()
            data = data.next_context_data()

    def ciphertext(self, arr: np.ndarray, level: int, scale: float) -> seal.Ciphertext:
        return rns.from_array(arr, self.parms_ids[level], scale, self.context, self.version)

    def one(self, ct_arr: np.ndarray, seg: Segment) -> np.ndarray:
        ct = self.ciphertext(ct_arr, seg.level, float(seg.scale))
        for k in range(seg.rescales + 1):
            if seg.relin and k == seg.relin_after:  # key-switching noise is absolute: relinearize while the
                if self.relin_keys is None:         # scale is still large, but at a lower (cheaper) level
                    raise CiphertextError("the batch plan needs relinearization keys: send them with the keys")
                ct = self.evaluator.relinearize(ct, self.relin_keys)
            if k < seg.rescales:
                ct = self.evaluator.rescale_to_next(ct)
        return rns.to_array(ct)

    def __call__(self, arr: np.ndarray, seg: Segment) -> np.ndarray:
        return np.stack([self.one(a, seg) for a in arr])  # seal-python holds the GIL: threads do not help

    def output_ciphertexts(self, arr: np.ndarray, level: int, scale: float) -> list[seal.Ciphertext]:
        return [self.ciphertext(a, level, scale) for a in arr]


class NativeBoundary:
    """The same boundary on medhe's native runtime (GIL released, so ciphertexts run on every core). Measured on
    the shared 2-core machine for the default model's 32 size-3 ciphertexts: 0.31-0.39 s, SEAL 0.28-0.37 s."""

    def __init__(self, plan: BatchPlan, relin_keys: seal.RelinKeys | None) -> None:
        from medhe.he.ckks.backends.native import NativeBackend

        self.backend = NativeBackend(plan.params)
        self.keys = self.backend._keys_from_seal(None, relin_keys) if relin_keys is not None else None

    def one(self, arr: np.ndarray, seg: Segment) -> np.ndarray:
        ctx = self.backend.ctx
        ct = ctx.ciphertext(arr, seg.level, float(seg.scale))
        for k in range(seg.rescales + 1):
            if seg.relin and k == seg.relin_after:
                if self.keys is None:
                    raise CiphertextError("the batch plan needs relinearization keys: send them with the keys")
                ct = ctx.relinearize(ct, self.keys)
            if k < seg.rescales:
                ct = ctx.rescale(ct)
        return ct.to_array()

    def __call__(self, arr: np.ndarray, seg: Segment) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(default_threads()) as pool:
            return np.stack(list(pool.map(lambda a: self.one(a, seg), arr)))


def make_boundary(plan: BatchPlan, relin_keys: seal.RelinKeys | None, engine: str = "auto") -> Callable:
    """``native`` (medhe's runtime), ``seal``, or ``auto``: native when the extension is built."""
    if engine in ("auto", "native"):
        try:
            return NativeBoundary(plan, relin_keys)
        except ImportError:
            if engine == "native":
                raise PlanError("the native runtime (medhe.he.ckks._runtime) is not built here") from None
    return SealBoundary(plan, relin_keys)


def run_batch(plan: BatchPlan, kernels: list[Any], inputs: np.ndarray,
              boundary: Callable[[np.ndarray, Segment], np.ndarray], threads: int | None = None,
              timings: dict[str, float] | None = None) -> np.ndarray:
    """Evaluate ``plan`` on ``inputs`` (input ciphertexts, 2, primes, N); returns the output residues."""
    import time

    threads = threads or default_threads()
    cur = inputs
    for seg, kernel in zip(plan.segments, kernels):
        t0 = time.perf_counter()
        try:
            cur = kernel.run(cur, seg.output, threads, CHUNK)
        except ValueError as exc:
            raise CiphertextError(f"the batch kernel refused its input ({exc}): encrypt with this server's "
                                  "batch spec") from None
        t1 = time.perf_counter()
        cur = boundary(cur, seg)
        if timings is not None:
            timings["kernel_s"] = timings.get("kernel_s", 0.0) + t1 - t0
            timings["boundary_s"] = timings.get("boundary_s", 0.0) + time.perf_counter() - t1
    return cur
