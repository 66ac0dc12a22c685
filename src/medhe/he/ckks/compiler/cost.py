"""Predicted operation times: what the planner ranks layouts by and ``medhe inspect`` reports.

Microseconds per (prime x 1024 coefficients) of one operation on a 2-polynomial ciphertext, fitted to SEAL's
generic build on this project's CPU (rotation 4.7 ms at 6 primes and N=8192, /work/shared/docs/ckks-engine-v2.md;
multiply_plain and rescale a few percent of it; ``medhe bench --scheme ckks --ops`` measures them). Predictions
rank plans; benchmarks measure them.
"""

from __future__ import annotations

from medhe.he.ckks.compiler.instructions import CT_PRODUCTS

OP_US_PER_PRIME_SLOT = {"rotation": 98.0, "product": 2.5, "ct_product": 12.0, "relin": 98.0, "rescale": 5.0,
                        "encode": 6.0}


def op_ms(kind: str, poly_degree: int, level: int) -> float:
    """Predicted milliseconds of one ``kind`` operation at ``level`` (level + 1 primes)."""
    return OP_US_PER_PRIME_SLOT[kind] * (level + 1) * (poly_degree / 1024) / 1e3


def instr_cost(plan, ins, seen: set) -> tuple[int, int, int, float]:
    """(key switches, plaintext products, ciphertext products, predicted ms) of one instruction; ``seen`` carries
    the baby rotations of input blocks already made (the interpreter shares them across output blocks)."""
    n = plan.params.poly_degree
    level = plan.registers[ins.srcs[0]].level
    if ins.op == "linear":
        if plan.multi_block:
            rot = plan.instr_rotations(ins, seen)
        else:
            rot = sum(len(plan.key_path(s)) for s in [b for b in ins.babies if b]
                      + [g for g, _ in ins.groups if g] + ins.reduce) + bool(ins.conjugate)
        products = sum(len(t) for _, t in ins.groups)
        ms = (rot * op_ms("rotation", n, level) + products * op_ms("product", n, level)
              + len(ins.groups) * op_ms("rescale", n, level))
        return rot, products, 0, ms
    k = CT_PRODUCTS[ins.op]
    return 0, 0, k, k * (op_ms("ct_product", n, level) + op_ms("relin", n, level) + op_ms("rescale", n, level))


def plan_ms(plan) -> float:
    """Predicted server milliseconds of a whole plan (what ``medhe inspect`` totals)."""
    seen: set = set()
    return sum(instr_cost(plan, ins, seen)[3] for ins in plan.instrs)
