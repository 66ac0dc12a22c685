"""The compiled CKKS program: registers (slot layout, level, scale), plaintexts, and a straight-line instruction list.

The plan's public part (``Plan.public()``) is what the client needs: parameters, the input gather map, rotation
steps, the level each evaluation key is used at, output slots. The private part is the plaintext weights.

Batch dimension: ``Plan.batch`` (and ``Layout.batch``) is the number of images one ciphertext carries. 1 is the
single-image tiling every plan uses today (one image spread over the slots, possibly replicated); a slot-batched
plan (one image per slot, up to ``slots`` images per ciphertext) sets it > 1. It is published as
``input.batch`` only when it is not 1, so the ids of single-image plans do not change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medhe.errors import PlanError
from medhe.he.ckks.compiler.packing import Layout
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.ckks.compiler.instructions import CT_PRODUCTS, Instr  # noqa: F401  (Instr: where plans import it)
from medhe.he.ckks.compiler.trace import Graph

FORMAT = "medhe-ckks-plan/1"


@dataclass
class PlainVec:
    """A plaintext the server encodes once at load time (vector of slot values, or one scalar)."""

    values: np.ndarray | float
    level: int
    scale: float


@dataclass
class Register:
    layout: Layout
    level: int
    scale: float
    block: int = 0  # which ciphertext of a multi-block value (``layout.blocks`` > 1) this register holds


@dataclass
class Plan:
    params: CKKSParams
    graph: Graph | None  # None for plans loaded from bytes (the IR is only needed for debugging)
    instrs: list[Instr]
    registers: list[Register]
    plains: list[PlainVec]
    gather: np.ndarray  # (input ciphertexts, slots) input element per slot, -1 = zero
    input_level: int
    output_register: int
    output_count: int
    node_register: dict[int, int]
    strategies: list[str]
    input_shape: tuple[int, ...] = ()
    key_paths: dict[int, list[int]] = field(default_factory=dict)  # logical step -> key steps (when decomposed)
    output_bound: float | None = None  # the largest |output| the chain was sized for (published for the client)
    # highest level each evaluation key is used at, set once by the compiler (``keybudget.key_levels_of``):
    # {"galois": {key step (str): level}, "relin": level or -1 without relinearization}
    key_levels: dict[str, Any] | None = None
    batch: int = 1  # images per ciphertext (1: one image tiled over the slots; see the module docstring)
    # multi-block plans (values spanning several ciphertexts): IR node -> its registers, one per block
    node_blocks: dict[int, list[int]] | None = None
    choices: list[str] = field(default_factory=list)  # multi-block: the layout chosen per layer, and why

    @property
    def multi_block(self) -> bool:
        return self.node_blocks is not None

    @property
    def input_scale(self) -> float:
        return self.registers[0].scale

    @property
    def input_complex(self) -> bool:
        """Input ciphertexts carry two taps per slot (real and imaginary part)."""
        return any(ins.conjugate for ins in self.instrs)

    @property
    def input_ciphertexts(self) -> int:
        return int(self.gather.shape[0]) // (2 if self.input_complex else 1)

    @property
    def rotation_steps(self) -> list[int]:
        """The Galois key steps the client must generate (exactly those the program uses; 0 = conjugation)."""
        conj = [0] if self.input_complex else []
        if self.key_paths:
            return conj + sorted({k for path in self.key_paths.values() for k in path}, key=lambda s: (abs(s), s))
        return conj + self.logical_steps

    def key_path(self, step: int) -> list[int]:
        """Key steps whose composition rotates by ``step``."""
        slots = self.params.slots
        signed = ((step + slots // 2) % slots) - slots // 2
        return self.key_paths.get(signed, [signed]) if self.key_paths else [signed]

    @property
    def logical_steps(self) -> list[int]:
        steps = set()
        for ins in self.instrs:
            if ins.op == "linear":
                steps.update(ins.babies)
                steps.update(g for g, _ in ins.groups)
                steps.update(ins.reduce)
        slots = self.params.slots
        signed = {((s + slots // 2) % slots) - slots // 2 for s in steps}
        signed.discard(0)
        return sorted(signed, key=lambda s: (abs(s), s))

    @property
    def needs_relin(self) -> bool:
        return any(ins.op != "linear" and ins.op != "add" for ins in self.instrs)

    @property
    def depth(self) -> int:
        return self.input_level - self.registers[self.output_register].level

    def rotation_usage(self) -> dict[int, float]:
        """Signed rotation step -> number of uses weighted by the primes at the level it runs on."""
        slots = self.params.slots
        usage: dict[int, float] = {}

        def add(step: int, level: int) -> None:
            signed = ((step + slots // 2) % slots) - slots // 2
            if signed:
                usage[signed] = usage.get(signed, 0.0) + level + 1

        for ins in self.instrs:
            if ins.op == "linear":
                level = self.registers[ins.dst].level
                for b in ins.babies:
                    add(b, level + 1)
                for g, _ in ins.groups:
                    add(g, level)
                for r in ins.reduce:
                    add(r, level)
        return usage

    def rotation_count(self) -> int:
        if self.multi_block:
            seen: set = set()
            return sum(self.instr_rotations(ins, seen) for ins in self.instrs)
        n = 0
        for ins in self.instrs:
            if ins.op == "linear":
                for step in [b for b in ins.babies if b] + [g for g, _ in ins.groups if g] + ins.reduce:
                    n += len(self.key_path(step))
        return n

    def instr_rotations(self, ins: Instr, seen: set) -> int:
        """Key switches of one multi-block linear instruction; ``seen``: (register, baby) rotations already
        made (the interpreter shares them between the output blocks of a layer)."""
        if ins.op != "linear":
            return 0
        n = 0
        for _, terms in ins.groups:
            for src, baby, _ in terms:
                if baby and (ins.srcs[src], baby) not in seen:
                    seen.add((ins.srcs[src], baby))
                    n += len(self.key_path(baby))
        for step in [g for g, _ in ins.groups if g] + ins.reduce:
            n += len(self.key_path(step))
        return n + bool(ins.conjugate)

    def public(self) -> dict[str, Any]:
        """JSON-able public plan: everything the client needs, nothing about the weights."""
        out_reg = self.registers[self.output_register]
        gather = np.ascontiguousarray(self.gather.astype(np.int32))
        pub = {
            "format": FORMAT,
            "params": self.params.to_dict(),
            "input": {"shape": list(self.input_shape), "level": self.input_level,
                      "scale": self.input_scale, "ciphertexts": self.input_ciphertexts,
                      "complex": self.input_complex,
                      "gather": base64.b64encode(zlib.compress(gather.tobytes(), 9)).decode("ascii")},
            "rotation_steps": self.rotation_steps,
            "relinearization": self.needs_relin,
            "output": {"slots": [int(s) for s in out_reg.layout.slots[: self.output_count]],
                       "level": out_reg.level, "count": self.output_count},
            "depth": self.depth,
            "key_levels": self.require_key_levels(),
        }
        if self.batch != 1:
            pub["input"]["batch"] = int(self.batch)
        if self.multi_block:  # ciphertext k holds slots k*slots .. (k+1)*slots-1 of the packed input
            pub["input"]["blocks"] = int(self.input_ciphertexts)
        if self.output_bound is not None:
            pub["output"]["bound"] = float(self.output_bound)
        if self.params.hybrid:  # announced, so a client that only makes SEAL's keys stops before keygen
            pub["key_envelope"] = {"version": 2, "format": "hybrid", "special_primes": self.params.specials,
                                   "alpha": self.params.alpha,
                                   "dnum": -(-(len(self.params.prime_bits) - self.params.specials) // self.params.alpha)}
        pub["plan_id"] = hashlib.sha256(json.dumps(pub, sort_keys=True).encode()).hexdigest()[:32]
        return pub

    def require_key_levels(self) -> dict[str, Any]:
        if self.key_levels is None:
            raise PlanError("the plan has no key levels: build plans with compile_plan (or load them with "
                            "load_server)")
        return self.key_levels

    def summary(self) -> dict[str, Any]:
        return {"poly_degree": self.params.poly_degree, "prime_bits": list(self.params.prime_bits),
                "scale_bits": self.params.scale_bits, "depth": self.depth,
                "input_ciphertexts": self.input_ciphertexts, "rotations": self.rotation_count(),
                "rotation_keys": len(self.rotation_steps), "logical_rotation_steps": len(self.logical_steps),
                "plaintext_multiplications": sum(len(t) for i in self.instrs for _, t in i.groups),
                "ciphertext_multiplications": sum(CT_PRODUCTS[i.op] for i in self.instrs),
                "strategies": self.strategies}


def naf(step: int) -> list[int]:
    """Signed powers of two summing to ``step`` (non-adjacent form: fewest terms)."""
    out, k, n = [], 0, int(step)
    sign = 1 if n >= 0 else -1
    n = abs(n)
    while n:
        if n & 1:
            digit = 2 - (n & 3)
            out.append(sign * digit * (1 << k))
            n -= digit
        n >>= 1
        k += 1
    return out


def decode_gather(public: dict[str, Any], slots: int) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(public["input"]["gather"]))
    rows = int(public["input"]["ciphertexts"]) * (2 if public["input"].get("complex") else 1)
    return np.frombuffer(raw, dtype=np.int32).reshape(rows, slots)
