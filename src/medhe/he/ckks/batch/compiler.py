"""Batch plans: one image per slot, so every tensor element is its own ciphertext and no rotation is ever needed.

The network is the single-image compiler's prepared graph (folded linear maps, activations factored so each costs
one ciphertext multiplication: ``u·(±u + β) + c``). Linear layers become sparse matrices of small signed integer
weights applied to whole ciphertexts, activations dyadic squares. Nothing is rescaled while the modulus has room:
the values' scale grows through a *segment* (linear, square, linear, ...), and only at its end, where the tensor is
small (after the linear layer that follows an activation, e.g. 32 ciphertexts instead of 1,568), is the result
relinearized and rescaled by as many primes as keep its precision. A linear combination of size-3 ciphertexts is
still size 3, so relinearization is deferred in the same way.

Scales are exact rationals (powers of two over products of primes) so every constant is encoded as the exact
integer SEAL would use. The parameters are chosen by a small search over the input scale, the weight precision
and the lowest scale allowed after a rescale, maximising the worst of the three precisions; every chain goes
through the 128-bit check (``params.choose_params``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.sparse as sp
from torch import nn

from medhe.errors import PlanError
from medhe.he.ckks.compiler.driver import prepare_graph
from medhe.he.ckks.compiler.params import CKKSParams, choose_params, data_primes
from medhe.he.ckks.compiler.prepare import PolyForm
from medhe.he.ckks.compiler import trace
from medhe.he.ckks.compiler.trace import Graph
from medhe.he.security import MAX_MODULUS_BITS_128

FORMAT = "medhe-ckks-batch-plan/1"
PRIME_BITS = 30  # data primes stay below 2^31: the kernel multiplies residues as int32
SPECIAL_BITS = {8192: 38, 16384: 48}  # key-switching prime (relinearization only)
MARGIN_BITS = 3  # headroom over the estimated |value| * scale before a value would wrap modulo Q
FRESH_NOISE_BITS = 10.5  # ~4.5 sigma of a fresh symmetric encryption's error in one slot at N=8192
ROUNDING_NOISE_BITS = 7.0  # ~4.5 sigma of a rescale's rounding error plus relinearization noise in one slot
# Key switching adds ~2^15 (absolute, one slot) with a 38-bit special prime over 30-bit primes: relinearize only
# where the scale is at least this large (measured: after all rescales, at 2^28, the logit error grew 30x).
RELIN_MIN_SCALE_BITS = 50
MAX_WEIGHT_BITS = 30  # |integer weight| < 2^31


@dataclass
class MacStep:
    """dst = matrix @ src + bias, on ciphertexts: ``matrix`` holds integer weights, ``bias`` exact integers."""

    src: int
    dst: int
    matrix: sp.csr_matrix
    bias: list[int]
    name: str = ""
    weight_bits: int = 0  # the weights are round(W * 2^weight_bits)


@dataclass
class Poly2Step:
    """dst = u·(sign·u + beta) + c with integer constants at the input's (beta) and output's (c) scale."""

    src: int
    dst: int
    sign: int
    beta: int
    c: int
    name: str = ""


@dataclass
class Segment:
    """Steps evaluated chunk by chunk without leaving the level, then relinearize + rescale the output."""

    level: int
    values: list[tuple[int, int]]  # (ciphertexts, polynomials); value 0 is the segment's input
    steps: list[MacStep | Poly2Step]
    output: int
    scale: Fraction  # of the output before the boundary
    relin: bool
    rescales: int
    relin_after: int = 0  # rescales done before relinearizing (cheaper at a lower level while the scale is large)

    @property
    def out_level(self) -> int:
        return self.level - self.rescales

    @property
    def relin_level(self) -> int:
        return self.level - self.relin_after


@dataclass
class BatchPlan:
    params: CKKSParams
    input_shape: tuple[int, ...]
    input_scale: Fraction
    segments: list[Segment]
    output_scale: Fraction
    output_bound: float
    input_bound: float = 1.0
    graph: Graph | None = None
    precision_bits: float = 0.0
    choice: dict[str, int] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return self.params.slots

    @property
    def batch(self) -> int:
        """Images per ciphertext."""
        return self.params.slots

    @property
    def input_level(self) -> int:
        return len(self.params.prime_bits) - 2

    @property
    def input_count(self) -> int:
        return self.segments[0].values[0][0]

    @property
    def output_count(self) -> int:
        seg = self.segments[-1]
        return seg.values[seg.output][0]

    @property
    def output_level(self) -> int:
        return self.segments[-1].out_level

    def public(self) -> dict[str, Any]:
        """What the client needs: parameters, input count and scale, output level and bound. No weights."""
        pub = {
            "format": FORMAT,
            "params": self.params.to_dict(),
            "batch": self.batch,
            "input": {"shape": list(self.input_shape), "level": self.input_level, "scale": float(self.input_scale),
                      "ciphertexts": self.input_count, "bound": float(self.input_bound), "batch": self.batch},
            "rotation_steps": [],
            "relinearization": True,
            "key_levels": {"galois": {}, "relin": max(s.relin_level for s in self.segments if s.relin)
                           if any(s.relin for s in self.segments) else -1},
            "output": {"count": self.output_count, "level": self.output_level, "bound": float(self.output_bound)},
        }
        pub["plan_id"] = hashlib.sha256(json.dumps(pub, sort_keys=True).encode()).hexdigest()[:32]
        return pub

    def memory_bytes(self) -> int:
        """Peak server memory of one batch: the largest segment input + output (RNS arrays), plus the upload."""
        n = self.params.poly_degree
        peak = 0
        for seg in self.segments:
            count, size = seg.values[0]
            out_count, out_size = seg.values[seg.output]
            word = 4 if seg is self.segments[0] else 8  # the first input is loaded as uint32
            peak = max(peak, (count * size * word + out_count * out_size * 8) * (seg.level + 1) * n)
        upload = self.input_count * n * sum(self.params.prime_bits[:-1]) // 8
        return peak + upload

    def summary(self) -> dict[str, Any]:
        return {"poly_degree": self.params.poly_degree, "prime_bits": list(self.params.prime_bits),
                "batch": self.batch, "input_ciphertexts": self.input_count, "output_ciphertexts": self.output_count,
                "segments": len(self.segments), "precision_bits": round(self.precision_bits, 1),
                "multiply_accumulates": sum(st.matrix.nnz for s in self.segments for st in s.steps
                                            if isinstance(st, MacStep)),
                "squares": sum(s.values[st.dst][0] for s in self.segments for st in s.steps
                               if isinstance(st, Poly2Step)),
                "boundary_ciphertexts": sum(s.values[s.output][0] for s in self.segments),
                "memory_bytes": self.memory_bytes(),
                **self.choice}


# ---------------------------------------------------------------------------------------------------------------
# graph checks and value bounds


def _chain(graph: Graph, forms: dict[int, PolyForm]) -> None:
    for i, node in enumerate(graph.nodes[1:], start=1):
        if node.op not in ("linear", "poly") or node.inputs != (i - 1,):
            raise PlanError(f"batch mode supports chains of linear layers and activations; layer {node.name!r} "
                            f"({node.op}) is not one: evaluate this model one image at a time")
        if node.op == "poly" and forms[i].degree != 2:
            raise PlanError(f"batch mode supports degree-2 activations; {node.name!r} has degree "
                            f"{forms[i].degree}: evaluate this model one image at a time")


def node_bounds(graph: Graph, input_bound: float = 1.0) -> list[float]:
    """Largest |value| of each node (the compiler's per-element bounds, reduced to one number a node)."""
    return [float(b.max()) for b in trace.node_bounds(graph, input_bound)]


# ---------------------------------------------------------------------------------------------------------------
# scheduling


def _log2(x: Fraction | float) -> float:
    x = Fraction(x)
    return math.log2(x.numerator) - math.log2(x.denominator)


class _Schedule:
    """One candidate: walk the chain with exact scales, open a new segment where a square would need a size-3
    input or the modulus would overflow. Raises ``_NoFit`` when the chain is too short."""

    def __init__(self, graph: Graph, forms: dict[int, PolyForm], bounds: list[float], primes: list[int],
                 input_bits: int, weight_bits: int, min_scale_bits: int, build: bool) -> None:
        self.graph, self.forms, self.bounds, self.primes = graph, forms, bounds, primes
        self.weight_bits, self.min_scale_bits, self.build = weight_bits, min_scale_bits, build
        self.level = len(primes) - 1
        self.scale = Fraction(2) ** input_bits
        self.segments: list[Segment] = []
        self.precision = input_bits - FRESH_NOISE_BITS
        self.open(graph.nodes[0].size, 2)

    def open(self, count: int, size: int) -> None:
        self.seg = Segment(self.level, [(count, size)], [], 0, self.scale, False, 0)
        self.cur = 0

    def q_bits(self, level: int) -> float:
        return sum(math.log2(q) for q in self.primes[: level + 1])

    def fits(self, bound: float, scale: Fraction, level: int) -> bool:
        return math.log2(max(bound, 1e-30)) + _log2(scale) + 1 + MARGIN_BITS <= self.q_bits(level)

    def close(self, bound: float, final: bool = False) -> None:
        """End the segment at its current value: relinearize (size 3) and rescale as far as precision allows."""
        count, size = self.seg.values[self.cur]
        self.seg.output, self.seg.scale, self.seg.relin = self.cur, self.scale, size == 3
        drops, scale = 0, self.scale
        while self.level - drops > 0:
            nxt = scale / self.primes[self.level - drops]
            if _log2(nxt) < self.min_scale_bits or not self.fits(bound, nxt, self.level - drops - 1):
                break
            drops, scale = drops + 1, nxt
        if drops == 0 and not final:
            raise _NoFit()
        self.seg.rescales = drops
        after, s = 0, self.scale
        while size == 3 and after < drops and _log2(s / self.primes[self.level - after]) >= RELIN_MIN_SCALE_BITS:
            s /= self.primes[self.level - after]
            after += 1
        self.seg.relin_after = after
        self.precision = min(self.precision, _log2(scale) - ROUNDING_NOISE_BITS)
        self.segments.append(self.seg)
        self.level -= drops
        self.scale = scale
        if not final:
            self.open(count, 2)

    def add_value(self, count: int, size: int) -> int:
        self.seg.values.append((count, size))
        return len(self.seg.values) - 1

    def run(self) -> None:
        g = self.graph
        pending_c = 0.0  # an activation's constant, folded into the next linear layer's bias
        for i, node in enumerate(g.nodes[1:], start=1):
            count, size = self.seg.values[self.cur]
            if node.op == "linear":
                w = node.matrix
                peak = float(abs(w).max()) if w.nnz else 1.0
                k = self.weight_bits - max(0, math.ceil(math.log2(peak))) if peak > 0 else self.weight_bits
                out_scale = self.scale * Fraction(2) ** k
                if not self.fits(self.bounds[i], out_scale, self.level):
                    if self.seg.steps:
                        self.close(self.bounds[i - 1])
                        count, size = self.seg.values[self.cur]
                        out_scale = self.scale * Fraction(2) ** k
                    if not self.fits(self.bounds[i], out_scale, self.level):
                        raise _NoFit()
                mat = sp.csr_matrix(w, copy=True)
                mat.data = np.rint(mat.data * 2.0 ** k)
                if np.abs(mat.data).max(initial=0) >= 2 ** 31:
                    raise _NoFit()
                bias_exact = np.asarray(node.bias, dtype=np.float64) + (w @ np.full(w.shape[1], pending_c)
                                                                        if pending_c else 0.0)
                pending_c = 0.0
                dst = self.add_value(node.size, size)
                if self.build:
                    mat.data = mat.data.astype(np.int64)
                    mat.eliminate_zeros()
                    bias = [round(Fraction(float(b)) * out_scale) for b in bias_exact]
                    self.seg.steps.append(MacStep(self.cur, dst, mat, bias, node.name, k))
                self.cur, self.scale = dst, out_scale
            else:
                form = self.forms[i]
                if size == 3 or not self.fits(self.bounds[i] + abs(form.consts["c"]), self.scale ** 2, self.level):
                    self.close(self.bounds[i - 1])
                    count, size = self.seg.values[self.cur]
                    if not self.fits(self.bounds[i] + abs(form.consts["c"]), self.scale ** 2, self.level):
                        raise _NoFit()
                c = form.consts["c"]
                nxt = g.nodes[i + 1] if i + 1 < len(g.nodes) else None
                fold = nxt is not None and nxt.op == "linear"
                dst = self.add_value(count, 3)
                beta = round(Fraction(form.consts["beta"]) * self.scale)
                self.scale = self.scale ** 2
                c_int = 0 if fold else round(Fraction(c) * self.scale)
                if fold:
                    pending_c = c
                self.seg.steps.append(Poly2Step(self.cur, dst, form.sign, beta, c_int, node.name))
                self.cur = dst
        self.close(self.bounds[-1], final=True)


class _NoFit(Exception):
    pass


def _params_for(poly_degree: int) -> CKKSParams:
    special = SPECIAL_BITS[poly_degree]
    count = (MAX_MODULUS_BITS_128[poly_degree] - special) // PRIME_BITS
    return choose_params(count - 1, poly_degree=poly_degree, scale_bits=PRIME_BITS,
                         prime_bits=[PRIME_BITS] * count + [special])


def compile_batch_plan(model: nn.Module, input_shape: tuple[int, ...],
                       activation_ranges: dict[str, Any] | None = None, *, poly_degree: int | None = None,
                       input_bound: float = 1.0, **unknown: Any) -> BatchPlan:
    """A batch plan for ``model`` on inputs of ``input_shape`` (one image per slot)."""
    if unknown:
        raise PlanError(f"unknown CKKS batch option(s) {', '.join(sorted(unknown))}: use poly_degree or input_bound")
    graph, forms = prepare_graph(model, tuple(input_shape), activation_ranges)
    _chain(graph, forms)
    bounds = node_bounds(graph, input_bound)
    degrees = [int(poly_degree)] if poly_degree else sorted(SPECIAL_BITS)
    for n in degrees:
        if n not in SPECIAL_BITS:
            raise PlanError(f"batch plans support ring degrees {sorted(SPECIAL_BITS)}, not {n}")
        params = _params_for(n)
        primes = data_primes(params)
        best = None
        for input_bits in range(PRIME_BITS + 2, 19, -1):
            for weight_bits in range(MAX_WEIGHT_BITS - 6, 9, -1):
                for min_scale in range(PRIME_BITS + 4, 19, -1):
                    sched = _Schedule(graph, forms, bounds, primes, input_bits, weight_bits, min_scale, False)
                    try:
                        sched.run()
                    except _NoFit:
                        continue
                    key = (round(min(sched.precision, weight_bits - 1), 2), -len(sched.segments), input_bits)
                    if best is None or key > best[0]:
                        best = (key, (input_bits, weight_bits, min_scale))
        if best is None:
            continue
        input_bits, weight_bits, min_scale = best[1]
        sched = _Schedule(graph, forms, bounds, primes, input_bits, weight_bits, min_scale, True)
        sched.run()
        return BatchPlan(params, tuple(graph.input_shape), Fraction(2) ** input_bits, sched.segments,
                         sched.scale, float(bounds[-1]), float(input_bound), graph, float(best[0][0]),
                         {"input_scale_bits": input_bits, "weight_bits": weight_bits,
                          "min_scale_bits": min_scale})
    raise PlanError("the model's values do not fit any secure batch chain (128-bit, primes below 2^31): "
                    "evaluate it one image at a time")
