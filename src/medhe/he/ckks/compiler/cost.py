"""Predicted operation times: what the planner ranks layouts by and ``medhe inspect`` reports.

Microseconds per (prime x 1024 coefficients) of one operation on a 2-polynomial ciphertext, fitted to SEAL's
generic build on this project's CPU (rotation 4.7 ms at 6 primes and N=8192, /work/shared/docs/ckks-engine-v2.md;
multiply_plain and rescale a few percent of it; ``medhe bench --scheme ckks --ops`` measures them). Predictions
rank plans; benchmarks measure them.
"""

from __future__ import annotations

OP_US_PER_PRIME_SLOT = {"rotation": 98.0, "product": 2.5, "ct_product": 12.0, "relin": 98.0, "rescale": 5.0,
                        "encode": 6.0}


def op_ms(kind: str, poly_degree: int, level: int) -> float:
    """Predicted milliseconds of one ``kind`` operation at ``level`` (level + 1 primes)."""
    return OP_US_PER_PRIME_SLOT[kind] * (level + 1) * (poly_degree / 1024) / 1e3
