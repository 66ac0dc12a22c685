"""The CKKS instruction set, declared once: each op's operands, plaintext constants and ciphertext products, and
the one JSON encoding of an instruction that plan files and encrypted-weight programs share.

Before this table the op names were spelled out in the runtime, the plan file, the encrypted-weight program and
the cost model, and the decoder was copied; a new op now means one entry here plus its evaluation in
``runtime.run_program`` (and the native program's lowering).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Instr:
    """One step of the program; ``op`` names an entry of ``INSTRUCTIONS``."""

    op: str
    dst: int
    srcs: tuple[int, ...]
    name: str = ""
    babies: list[int] = field(default_factory=list)
    groups: list[tuple[int, list[tuple[int, int, int]]]] = field(default_factory=list)  # (giant, [(src, baby, pt)])
    reduce: list[int] = field(default_factory=list)
    consts: dict[str, int] = field(default_factory=dict)  # name -> plaintext index
    sign: int = 1
    node: int = -1  # IR node this instruction computes (for debugging)
    conjugate: bool = False  # linear: add the complex conjugate after the reduction (complex-packed input)


@dataclass(frozen=True)
class OpSpec:
    """``operands``: ciphertext registers read (None: one or more, a linear map's input blocks); ``consts``: the
    plaintext constants it may name (``required`` of them always); ``ct_products``: ciphertext x ciphertext
    products (each a relinearization and a rescale), what the cost model and the plan's report count."""

    operands: int | None
    consts: frozenset[str]
    required: frozenset[str]
    ct_products: int
    meaning: str


def _op(operands: int | None, consts: str, required: str, ct_products: int, meaning: str) -> OpSpec:
    return OpSpec(operands, frozenset(consts.split()), frozenset(required.split()), ct_products, meaning)


INSTRUCTIONS: dict[str, OpSpec] = {
    "linear": _op(None, "bias", "", 0, "plaintext matrix (rotations and plaintext products), optional bias"),
    "poly2": _op(1, "beta c", "beta", 1, "sign(a)·u·(sign(a)·u + beta) + c: a quadratic with its scale folded in"),
    "poly3": _op(1, "th kz c", "th kz", 2, "sign·u·((u + th)² + kz) + c: a cubic in two levels"),
    "gate3": _op(2, "th kz c", "th kz", 3, "x · cubic(u), the gate evaluated with its product to save a level"),
    "mul": _op(2, "", "", 1, "product of two ciphertexts (squeeze-and-excitation)"),
    "add": _op(2, "", "", 0, "sum of two ciphertexts (residual)"),
}
OPS = tuple(INSTRUCTIONS)
CT_PRODUCTS = {name: spec.ct_products for name, spec in INSTRUCTIONS.items()}


def instr_to_dict(ins: Instr) -> dict[str, Any]:
    """The JSON form of one instruction (plan files and encrypted-weight programs)."""
    return asdict(ins)


def instr_from_dict(d: dict[str, Any], plains: int, registers: int) -> Instr:
    """One instruction from :func:`instr_to_dict` output, checked against the table and the program's sizes
    (``plains`` constants, ``registers`` registers); raises ``ValueError`` naming what is wrong."""
    ins = Instr(op=str(d["op"]), dst=int(d["dst"]), srcs=tuple(int(x) for x in d["srcs"]), name=str(d["name"]),
                babies=[int(b) for b in d["babies"]],
                groups=[(int(g), [(int(a), int(b), int(c)) for a, b, c in terms]) for g, terms in d["groups"]],
                reduce=[int(x) for x in d["reduce"]], consts={str(k): int(v) for k, v in d["consts"].items()},
                sign=int(d["sign"]), node=int(d["node"]), conjugate=bool(d.get("conjugate", False)))
    check(ins, plains, registers)
    return ins


def check(ins: Instr, plains: int, registers: int) -> None:
    """``ValueError`` unless ``ins`` is a known op with its operands and constants, every index in range."""
    spec = INSTRUCTIONS.get(ins.op)
    if spec is None:
        raise ValueError(f"unknown instruction {ins.op!r}")
    if (len(ins.srcs) < 1) if spec.operands is None else (len(ins.srcs) != spec.operands):
        raise ValueError(f"instruction {ins.name!r} ({ins.op}) reads {len(ins.srcs)} registers")
    names = set(ins.consts)
    if not spec.required <= names <= spec.consts:
        raise ValueError(f"instruction {ins.name!r} ({ins.op}) has constants {sorted(names)}")
    refs = [pt for _, terms in ins.groups for _, _, pt in terms] + list(ins.consts.values())
    if any(not 0 <= x < plains for x in refs) or any(not 0 <= x < registers for x in ins.srcs + (ins.dst,)):
        raise ValueError(f"instruction {ins.name!r} refers to missing data")
