"""The CKKS lowering: a prepared graph -> a straight-line program of SEAL operations, every level and scale decided.

Each node is laid out in slots and lowered with the cheapest strategy (``packing``), each plaintext encoded at the
exact scale that keeps every ciphertext at scale 2^scale_bits after a linear layer. ``_Lowering`` is the base
(everything in one ciphertext); ``blocklower.BlockLowering`` extends it to values spread over several. Which ring,
which primes and which lowering to run is the driver's choice (``driver.compile_plan``).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from medhe.errors import PlanError
from medhe.he.ckks.compiler import packing
from medhe.he.ckks.compiler.packing import Layout, Lowered
from medhe.he.ckks.compiler.prepare import PolyForm
from medhe.he.ckks.compiler.program import Instr, PlainVec, Register
from medhe.he.ckks.compiler.trace import Graph, Node


def _layout_requests(graph: Graph) -> dict[int, int]:
    """linear node -> node whose layout it must produce (the other operand of a later mul/add)."""
    requests: dict[int, int] = {}
    for node in graph.nodes:
        if node.op in ("mul", "add"):
            a, b = node.inputs
            p = b
            while graph.nodes[p].op == "poly":
                p = graph.nodes[p].inputs[0]
            if graph.nodes[p].op == "linear" and p > a:
                requests[p] = a
    return requests


def _output_linear(graph: Graph) -> int | None:
    """The linear node the output comes from, through trailing activations only (None if it ends otherwise)."""
    i = len(graph.nodes) - 1
    while i > 0 and graph.nodes[i].op == "poly":
        i = graph.nodes[i].inputs[0]
    return i if graph.nodes[i].op == "linear" else None


# ---------------------------------------------------------------------------------------------------------------
# lowering


class _Lowering:
    def __init__(self, graph: Graph, forms: dict[int, PolyForm], slots: int, primes: list[int], scale: float,
                 top: int) -> None:
        self.graph, self.forms, self.slots, self.primes, self.scale = graph, forms, slots, primes, scale
        self.top = top
        self.instrs: list[Instr] = []
        self.registers: list[Register] = []
        self.plains: list[PlainVec] = []
        self.node_reg: dict[int, int] = {}
        self.strategies: list[str] = []
        self.requests = _layout_requests(graph)
        self.output_linear = _output_linear(graph)
        self.output_scale = scale
        self.pack_only = False
        self.clean_output = True
        # Inputs are encrypted 2 bits above the scale: fresh noise shrinks 4x relative to the data, and the
        # first layer's weights (encoded at q * scale / input_scale) keep 26 bits. The top modulus has room.
        self.input_scale = scale * 4
        self.gather = np.zeros((0, slots), dtype=np.int64)
        self.deferred_gates: dict[int, int] = {}  # cubic gate node -> register of its (scaled) input

    # -- helpers
    def reg(self, layout: Layout, level: int, scale: float) -> int:
        if level < 0:
            raise _TooDeep()
        self.registers.append(Register(layout, level, scale))
        return len(self.registers) - 1

    def plain(self, values: np.ndarray | float, level: int, scale: float) -> int:
        self.plains.append(PlainVec(values, level, scale))
        return len(self.plains) - 1

    def run(self) -> None:
        g = self.graph
        users = g.consumers(0)
        gather_node = users[0] if len(users) == 1 and g.nodes[users[0]].op == "linear" else None
        if self.pack_only:
            gather_node = None
        if gather_node is None:
            self.pack_input()
        for i, node in enumerate(g.nodes[1:], start=1):
            if node.op == "linear":
                if i == gather_node:
                    self.node_reg[i] = self.lower_gather(node, i)
                else:
                    self.node_reg[i] = self.lower_linear(node, i)
            elif node.op == "poly":
                self.node_reg[i] = self.lower_poly(node, i)
            elif node.op == "mul":
                self.node_reg[i] = self.lower_mul(node, i)
            elif node.op == "add":
                self.node_reg[i] = self.lower_add(node, i)
            else:  # pragma: no cover
                raise PlanError(f"unknown IR op {node.op!r}")

    def pack_input(self) -> None:
        """No linear first layer: the client sends the input once, compact and replicated."""
        shape = self.graph.input_shape
        size = int(np.prod(shape))
        period = packing.next_pow2(size)
        if period > self.slots:
            raise _TooWide()
        layout = packing.grid_layout(shape, period, True)
        gather = np.tile(np.arange(period), self.slots // period)
        gather[gather >= size] = -1
        self.gather = gather[None, :]
        self.node_reg[0] = self.reg(layout, self.top, self.input_scale)

    def linear_scales(self, src: int, i: int) -> tuple[int, float, float]:
        """(level, output scale, plaintext scale) of a linear layer reading register ``src``: the plaintext scale
        makes the product land on the target scale after one rescale (the output scale for the last node)."""
        src_reg = self.registers[src]
        level, in_scale = src_reg.level, src_reg.scale
        if level < 1:
            raise _TooDeep()
        target = self.output_scale if i == len(self.graph.nodes) - 1 else self.scale
        return level, target, self.primes[level] * target / in_scale

    def emit_linear(self, node: Node, i: int, srcs: tuple[int, ...], low: Lowered, name: str) -> int:
        level, target, pt_scale = self.linear_scales(srcs[0], i)
        groups: dict[int, list[tuple[int, int, int]]] = {}
        babies: set[int] = set()
        if low.strategy.startswith("gather"):
            groups[0] = [(k, 0, self.plain(vec, level, pt_scale)) for k, vec in low.diags.items() if np.any(vec)]
        else:
            g_step, _, _ = low.bsgs(self.slots)
            for d, vec in sorted(low.diags.items()):
                if not np.any(vec):
                    continue
                b = d % g_step
                giant = d - b
                babies.add(b)
                groups.setdefault(giant, []).append((0, b, self.plain(np.roll(vec, giant), level, pt_scale)))
        bias = node.bias if node.bias is not None else None
        layout = low.layout
        out = self.reg(layout, level - 1, target)
        consts = {}
        if bias is not None and np.any(bias):
            vec = np.zeros(self.slots)
            copies = self.slots // layout.period if layout.replicated else 1
            for k in range(copies):
                vec[layout.slots + k * layout.period] = bias
            consts["bias"] = self.plain(vec, level - 1, target)
        if not groups:  # an all-zero map: keep the program well-formed with one zero product
            groups[0] = [(0, 0, self.plain(np.zeros(self.slots), level, pt_scale))]
            babies.add(0)
        self.instrs.append(Instr("linear", out, srcs, name, babies=sorted(babies),
                                 groups=sorted(groups.items()), reduce=list(low.reduce), consts=consts, node=i,
                                 conjugate=low.strategy == "gather-complex"))
        self.strategies.append(f"{name}:{low.strategy}")
        return out

    # -- linear
    def lower_gather(self, node: Node, i: int) -> int:
        if packing.next_pow2(node.size) > self.slots:
            raise _TooWide()
        low, gather = packing.lower_gather(node.matrix, node.pattern, node.shape, self.slots, complex_pairs=True)
        self.gather = gather
        inputs = tuple(self.reg(packing.grid_layout(self.graph.input_shape, self.slots, False), self.top,
                                self.input_scale)
                       for _ in range(len(low.diags)))
        self.node_reg[0] = inputs[0]
        return self.emit_linear(node, i, inputs, low, node.name)

    def lower_linear(self, node: Node, i: int) -> int:
        src = self.node_reg[node.inputs[0]]
        inp = self.registers[src].layout
        if packing.next_pow2(node.size) > self.slots:
            raise _TooWide()
        cands: list[Lowered] = []
        if self.clean_output and i == self.output_linear and len(node.shape) == 1:
            # The client decrypts every slot of the result. A rotate-and-sum leaves partial sums of the last
            # layer's products (weight x hidden activation) in the slots around the logits, which would tell the
            # client far more about the private weights than the logits do. Summing over the whole period
            # instead leaves a copy of a logit (or an exact zero) in every slot, for a few more rotations at
            # the lowest level. Trailing activations then hold p(logit) and the constant p(0). An input whose
            # copies repeat more often than the output needs is read from its first copy only.
            rep = (packing.lower_hybrid_replicated(node.matrix, inp, self.slots)
                   or packing.lower_hybrid_replicated(node.matrix, Layout(inp.slots, self.slots), self.slots))
            return self.emit_linear(node, i, (src,), rep, node.name)
        if i in self.requests and self.requests[i] in self.node_reg:
            want = self.registers[self.node_reg[self.requests[i]]].layout
            cands.append(packing.lower_direct(node.matrix, inp, want, self.slots))
        elif len(node.shape) == 3:
            lay = None
            if node.stride is not None and len(self.graph.nodes[node.inputs[0]].shape) == 3:
                lay = packing.strided_layout(inp, node.shape, node.stride, self.slots)
            if lay is None:
                period = max(packing.next_pow2(node.size), inp.period if inp.replicated else 1)
                lay = packing.grid_layout(node.shape, period if inp.replicated else self.slots, inp.replicated)
            cands.append(packing.lower_direct(node.matrix, inp, lay, self.slots))
        elif self.feeds_broadcast(i) and (rep := packing.lower_hybrid_replicated(node.matrix, inp, self.slots)):
            cands.append(rep)
        else:
            for cand in (packing.lower_hybrid(node.matrix, inp, self.slots),
                         packing.lower_box(node.matrix, inp, self.slots)):
                if cand is not None:
                    cands.append(cand)
            period = packing.next_pow2(node.size)
            rep = inp.replicated and period % inp.period == 0
            cands.append(packing.lower_direct(node.matrix, inp, packing.grid_layout(
                node.shape, period if rep else self.slots, rep), self.slots))
        best = min(cands, key=lambda c: c.cost(self.slots))
        return self.emit_linear(node, i, (src,), best, node.name)

    def feeds_broadcast(self, i: int) -> bool:
        """Does this flat value reach a flat->image linear map (a channel broadcast) through activations only?"""
        todo = list(self.graph.consumers(i))
        while todo:
            k = todo.pop()
            node = self.graph.nodes[k]
            if node.op == "poly":
                todo.extend(self.graph.consumers(k))
            elif node.op == "linear" and len(node.shape) == 3:
                return True
        return False

    def normalize(self, src: int, want: Layout | None, name: str) -> int:
        """Identity (or re-layout) linear step: brings a value back to the standard scale, one level down."""
        reg = self.registers[src]
        n = len(reg.layout.slots)
        node = Node("linear", (), (n,), name, matrix=sp.csr_matrix(sp.identity(n)), bias=None)
        low = packing.lower_direct(node.matrix, reg.layout, want or reg.layout, self.slots)
        return self.emit_linear(node, -1, (src,), low, name)

    # -- non-linear
    def lower_poly(self, node: Node, i: int) -> int:
        src = self.node_reg[node.inputs[0]]
        reg = self.registers[src]
        form = self.forms[i]
        l, s = reg.level, reg.scale
        consts: dict[str, int] = {}
        if form.degree == 2:
            consts["beta"] = self.plain(form.consts["beta"], l, s)
            out_scale = s * s / self.primes[l]
            out = self.reg(reg.layout, l - 1, out_scale)
            if form.consts["c"]:
                consts["c"] = self.plain(form.consts["c"], l - 1, out_scale)
            self.instrs.append(Instr("poly2", out, (src,), node.name, consts=consts, sign=form.sign, node=i))
            return out
        users = self.graph.consumers(i)
        if len(users) == 1 and self.graph.nodes[users[0]].op == "mul" and self.graph.nodes[users[0]].inputs[1] == i:
            self.deferred_gates[i] = src  # evaluated together with its product (gate3): saves one level
            return -1
        consts["th"] = self.plain(form.consts["th"], l, s)
        s2 = s * s / self.primes[l]
        consts["kz"] = self.plain(form.consts["kz"], l - 1, s2)
        out_scale = s2 * s / self.primes[l - 1]
        out = self.reg(reg.layout, l - 2, out_scale)
        if form.consts["c"]:
            consts["c"] = self.plain(form.consts["c"], l - 2, out_scale)
        self.instrs.append(Instr("poly3", out, (src,), node.name, consts=consts, sign=form.sign, node=i))
        return out

    def _match_layouts(self, a: int, b: int, name: str) -> tuple[int, int, Layout]:
        la, lb = self.registers[a].layout, self.registers[b].layout
        if not np.array_equal(la.slots, lb.slots):
            b = self.normalize(b, la, f"{name}.relayout")
            lb = self.registers[b].layout
        rep = la.replicated and lb.replicated and la.period == lb.period
        layout = Layout(la.slots, la.period if rep else self.slots, rep, la.grid, la.box if rep else None)
        return a, b, layout

    def lower_mul(self, node: Node, i: int) -> int:
        if node.inputs[1] in self.deferred_gates:
            return self.lower_gate_mul(node, i)
        a, b = (self.node_reg[k] for k in node.inputs)
        a, b, layout = self._match_layouts(a, b, node.name)
        ra, rb = self.registers[a], self.registers[b]
        level = min(ra.level, rb.level)
        out = self.reg(layout, level - 1, ra.scale * rb.scale / self.primes[level])
        self.instrs.append(Instr("mul", out, (a, b), node.name, node=i))
        return out

    def lower_gate_mul(self, node: Node, i: int) -> int:
        """x * (a3·u³ + ...) as sign·(x·p)·((p + t·h)² + k·t²/a3) + c·x: the gate costs two levels, not three."""
        gate = node.inputs[1]
        form = self.forms[gate]
        x, u, layout = self._match_layouts(self.node_reg[node.inputs[0]], self.deferred_gates[gate], node.name)
        rx, ru = self.registers[x], self.registers[u]
        l, s, sx = min(ru.level, rx.level), ru.scale, rx.scale
        q = self.primes
        consts = {"th": self.plain(form.consts["th"], l, s)}
        s2 = s * s / q[l]
        consts["kz"] = self.plain(form.consts["kz"], l - 1, s2)
        out_scale = (sx * s / q[l]) * s2 / q[l - 1]
        out = self.reg(layout, l - 2, out_scale)
        if form.consts["c"]:
            consts["c"] = self.plain(form.consts["c"], l - 1, out_scale * q[l - 1] / sx)
        self.instrs.append(Instr("gate3", out, (x, u), node.name, consts=consts, sign=form.sign, node=i))
        return out

    def lower_add(self, node: Node, i: int) -> int:
        a, b = (self.node_reg[k] for k in node.inputs)
        a, b, layout = self._match_layouts(a, b, node.name)
        if not math.isclose(self.registers[a].scale, self.registers[b].scale, rel_tol=1e-9):
            if not math.isclose(self.registers[a].scale, self.scale, rel_tol=1e-9):
                a = self.normalize(a, None, f"{node.name}.rescale_a")
            if not math.isclose(self.registers[b].scale, self.scale, rel_tol=1e-9):
                b = self.normalize(b, None, f"{node.name}.rescale_b")
        ra, rb = self.registers[a], self.registers[b]
        if not math.isclose(ra.scale, rb.scale, rel_tol=1e-9):  # pragma: no cover - both normalized above
            raise PlanError(f"residual {node.name!r}: operand scales cannot be matched")
        out = self.reg(layout, min(ra.level, rb.level), ra.scale)
        self.instrs.append(Instr("add", out, (a, b), node.name, node=i))
        return out


class _TooDeep(Exception):
    pass


class _TooWide(Exception):
    pass
