"""Plaintext simulation of a batch plan: the integer weights and constants it really uses, no encryption noise.

What the compiler's choice of scales and weight precision costs on its own (quantization only), so the encrypted
error can be split into quantization and CKKS noise, and a plan can be checked on a whole dataset in seconds.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from medhe.he.ckks.batch.compiler import BatchPlan, MacStep, Poly2Step


def _exact(value: int, scale: Fraction) -> float:
    return float(Fraction(value) / scale)


def simulate(plan: BatchPlan, x: np.ndarray) -> np.ndarray:
    """(n, outputs) logits of ``x`` (n, *input shape) through ``plan``'s quantized program."""
    cur = np.asarray(x, dtype=np.float64).reshape(len(x), -1).T  # (input elements, images)
    scale = plan.input_scale
    for seg in plan.segments:
        vals = {0: cur}
        for st in seg.steps:
            if isinstance(st, MacStep):
                w_scale = Fraction(2) ** st.weight_bits
                out_scale = scale * w_scale
                bias = np.array([_exact(b, out_scale) for b in st.bias])
                vals[st.dst] = (st.matrix.astype(np.float64) @ vals[st.src]) / float(w_scale) + bias[:, None]
                scale = out_scale
            else:
                assert isinstance(st, Poly2Step)
                u = vals[st.src]
                vals[st.dst] = u * (st.sign * u + _exact(st.beta, scale)) + _exact(st.c, scale * scale)
                scale = scale * scale
        cur = vals[seg.output]
        scale = _after_boundary(plan, seg, scale)
    return cur.T


def _after_boundary(plan: BatchPlan, seg, scale: Fraction) -> Fraction:
    from medhe.he.ckks.compiler.params import data_primes

    primes = data_primes(plan.params)
    for k in range(seg.rescales):
        scale = scale / primes[seg.level - k]
    return scale
