"""The CKKS compiler: IR -> a straight-line program of SEAL operations with every level and scale decided.

Steps: (1) turn degree-1 activations into linear maps and fold; (2) factor each activation so it costs the fewest
ciphertext multiplications, pushing its scale factor into the producing linear layer
(a·x²+b·x = sign(a)·u·(sign(a)·u + b/t) with u = t·x, t = sqrt|a|; cubics as sign·u·((u+t·h)² + k·t²/a3));
(3) lay every value out in slots and lower each linear node with the cheapest strategy (``packing``); (4) pick the
smallest secure CKKS parameters for the resulting depth and value range, then lower again with the real primes so
each plaintext is encoded at the exact scale that keeps every ciphertext at scale 2^scale_bits after a linear layer.

The plan's public part (``Plan.public()``) is what the client needs: parameters, the input gather map, rotation
steps, output slots. The private part is the plaintext weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
from torch import nn

from medhe.errors import PlanError
from medhe.he.ckks.compiler import packing
from medhe.he.ckks.compiler.cost import plan_ms
from medhe.he.ckks.compiler.keybudget import (INPUT_BUDGET_BYTES, KEY_BUDGET_BYTES, choose_key_paths,
                                              ciphertext_bytes_as_sent, key_bytes_as_sent, key_levels_of)
from medhe.he.ckks.compiler.packing import Layout, Lowered
from medhe.he.ckks.compiler.params import (PRESETS, choose_params, data_primes, max_depth, output_scale_bits,
                                           params_for_ring)
from medhe.he.ckks.compiler.prepare import PolyForm, factor_polys, linearize_polys
from medhe.he.ckks.compiler.program import Instr, Plan, PlainVec, Register
from medhe.he.ckks.compiler.trace import Graph, Node, keep_large_kernels, trace
from medhe.he.ckks.compiler.trace import output_bound as estimate_output_bound


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


# ---------------------------------------------------------------------------------------------------------------
# entry point


def prepare_graph(model: nn.Module, input_shape: tuple[int, ...],
                  activation_ranges: dict[str, Any] | None = None,
                  multi_block: bool = False) -> tuple[Graph, dict[int, PolyForm]]:
    keep = keep_large_kernels if multi_block else None
    graph = linearize_polys(trace(model, input_shape, activation_ranges, keep=keep), keep)
    if len(graph.nodes) < 2:
        raise PlanError("the model has no layers to evaluate")
    return factor_polys(graph)


def _fake_primes(depth: int, scale_bits: int) -> list[int]:
    base = 2 ** scale_bits
    return [2 ** 40] + [base - (2 ** 14) * (k + 1) + 1 for k in range(depth)]


def compile_plan(model: nn.Module, input_shape: tuple[int, ...], activation_ranges: dict[str, Any] | None = None,
                 *, poly_degree: int | None = None, scale_bits: int | None = None,
                 prime_bits: list[int] | None = None,
                 output_bound: float | None = None, input_bound: float = 1.0, max_key_bytes: int = KEY_BUDGET_BYTES,
                 max_input_bytes: int = INPUT_BUDGET_BYTES, clean_output: bool = True,
                 key_switching: str = "seal", **unknown: Any) -> Plan:
    """Compile a torch ``nn.Sequential`` of medhe layers into a CKKS plan for inputs of ``input_shape``.

    Options: ``poly_degree``/``scale_bits``/``prime_bits`` force parameters (still 128-bit checked),
    ``output_bound`` the largest |logit| expected
    (default: estimated from the activation ranges), ``input_bound`` the largest |input| (1 for medhe's
    normalisation), ``max_key_bytes`` the evaluation-key budget, ``max_input_bytes`` the encrypted-input budget
    (beyond it the first layer is not laid out by the client), ``clean_output`` (default on) a final linear layer
    whose result holds nothing but copies of the logits in every slot (see ``_Lowering.lower_linear``),
    ``key_switching`` "seal" (SEAL's key format) or "hybrid" (few digits and several special primes, chosen by
    ``hybrid.planner`` from predicted time and keys' size within ``max_key_bytes``; native runtime only).
    """
    if unknown:
        raise PlanError(f"unknown CKKS option(s) {', '.join(sorted(unknown))}: use poly_degree, scale_bits, "
                        "prime_bits, max_key_bytes, max_input_bytes, output_bound, input_bound, clean_output or "
                        "key_switching")
    if key_switching not in ("seal", "hybrid"):
        raise PlanError(f"key_switching must be 'seal' or 'hybrid', not {key_switching!r}")
    degrees = [int(poly_degree)] if poly_degree else sorted(PRESETS)
    opts = dict(poly_degree=poly_degree, scale_bits=scale_bits, prime_bits=prime_bits, max_key_bytes=max_key_bytes,
                max_input_bytes=max_input_bytes, clean_output=clean_output, key_switching=key_switching)
    plan = needed = None
    if _may_fit_one_ciphertext(model, tuple(input_shape), activation_ranges, max(degrees) // 2):
        graph, forms = prepare_graph(model, tuple(input_shape), activation_ranges)
        max_abs = output_bound if output_bound is not None else estimate_output_bound(graph, input_bound)
        plan, needed = _compile_rings(graph, forms, max_abs, degrees, None, **opts)
    if plan is None and needed is None:
        # No ring holds the largest value in one ciphertext: values span several (``blocklower``). Pools stay
        # separate from the convs after them there (see ``keep_large_kernels``).
        from medhe.he.ckks.compiler.blocklower import BlockLowering

        graph, forms = prepare_graph(model, tuple(input_shape), activation_ranges, multi_block=True)
        max_abs = output_bound if output_bound is not None else estimate_output_bound(graph, input_bound)
        plan, needed = _compile_rings(graph, forms, max_abs, degrees, BlockLowering, **opts)
    if plan is not None:
        return plan
    if needed is None:
        raise PlanError(f"the model's values (largest {max(n.size for n in graph.nodes)} elements) do not fit the "
                        f"slots of any secure CKKS ring (at most {max(PRESETS) // 2}); use smaller images")
    biggest = max(degrees)
    raise PlanError(f"the model needs multiplicative depth {needed} but the largest secure CKKS parameters "
                    f"(N={biggest}, 128-bit) allow depth {max_depth(biggest)}; use fewer activation layers "
                    "or a smaller model")


def _compile_rings(graph: Graph, forms: dict[int, PolyForm], max_abs: float, degrees: list[int], cls: Any, *,
                   poly_degree: int | None, scale_bits: int | None, prime_bits: list[int] | None,
                   max_key_bytes: int, max_input_bytes: int, clean_output: bool,
                   key_switching: str = "seal") -> tuple[Plan | None, int | None]:
    """The plan on the smallest ring that fits (``cls``: the lowering, None for one ciphertext per value), or
    (None, depth needed) / (None, None) when no ring holds the values."""
    needed = None
    candidates: list[tuple[float, int, int, Plan, int]] = []
    too_big = ""
    skipped: list[str] = []
    bound = _depth_lower_bound(graph, forms) if cls is not None else 0
    for n in degrees:
        slots = n // 2
        if poly_degree is None and prime_bits is None and bound > max_depth(n):
            needed = bound
            continue  # a block lowering at this ring would only show that it is too shallow (tens of seconds)
        sb = scale_bits or PRESETS.get(n, (28, 0))[0]
        probe_depth = 64
        try:
            probe = _lower(graph, forms, slots, _fake_primes(probe_depth, sb), float(2 ** sb), probe_depth,
                           None, clean_output=clean_output, cls=cls)
        except _TooWide:
            continue
        needed = probe_depth - min(r.level for r in probe.registers)
        if prime_bits is not None or poly_degree is not None:
            params = choose_params(needed, max_abs, poly_degree=n, scale_bits=scale_bits, prime_bits=prime_bits)
        else:
            params = params_for_ring(n, needed, max_abs, scale_bits)
            if params is None:
                continue
        primes = data_primes(params)
        top = len(primes) - 1
        # im2col inputs cost one ciphertext per group of taps; past the byte budget the client sends the input
        # once instead and the first layer is evaluated with rotations like any other (same depth either way).
        n_ct = len([r for r in probe.registers if r.level == probe_depth])
        pack = n_ct * ciphertext_bytes_as_sent(params) > max_input_bytes and n_ct > 1
        if cls is not None and len(probe.gather) * ciphertext_bytes_as_sent(params) > max_input_bytes:
            too_big = (f"the packed input needs {len(probe.gather)} ciphertexts "
                       f"({len(probe.gather) * ciphertext_bytes_as_sent(params) / 1e6:.1f} MB at N={n}), over the "
                       f"input budget of {max_input_bytes / 1e6:.1f} MB: raise max_input_bytes or use smaller images")
            skipped.append(f"N={n} input {len(probe.gather) * ciphertext_bytes_as_sent(params) / 1e6:.1f} MB over "
                           "the input budget")
            continue
        plan_low = _lower(graph, forms, slots, primes, params.scale, top,
                          float(2 ** output_scale_bits(params, max_abs)), pack, clean_output, cls=cls)
        out_reg = plan_low.node_reg[len(graph.nodes) - 1]
        plan = Plan(params, graph, plan_low.instrs, plan_low.registers, plan_low.plains, plan_low.gather,
                    top, out_reg, graph.nodes[-1].size, plan_low.node_reg, plan_low.strategies,
                    tuple(graph.input_shape))
        if cls is not None:
            plan.node_blocks = plan_low.node_blocks
            plan.choices = plan_low.choices
        levels = key_levels_of(plan)  # with one key per step; keys are sent trimmed to these levels
        if key_switching == "hybrid":  # same data primes, so the lowering above stands; new special primes
            from medhe.he.ckks.hybrid.planner import choose as choose_hybrid

            hybrid = choose_hybrid(params, levels, max_key_bytes)
            params = plan.params = hybrid.params
            plan.choices = list(plan.choices) + [hybrid.describe()]
        per_key = {int(s): key_bytes_as_sent(params, lv) for s, lv in levels["galois"].items()}
        fixed = per_key.pop(0, 0) + (key_bytes_as_sent(params, levels["relin"]) if levels["relin"] >= 0 else 0)
        plan.key_paths = choose_key_paths(plan.rotation_usage(), slots, per_key, max_key_bytes - fixed)
        plan.output_bound = float(max_abs)
        plan.key_levels = key_levels_of(plan)  # once, with the final key paths
        if key_switching == "hybrid":  # the planner priced one key per step; say what is sent after the key paths
            final = sum(key_bytes_as_sent(params, lv) for lv in plan.key_levels["galois"].values())
            final += key_bytes_as_sent(params, plan.key_levels["relin"]) if plan.key_levels["relin"] >= 0 else 0
            plan.choices[-1] += (f"; {len(plan.rotation_steps)} rotation keys, {final / 1e6:.1f} MB as sent "
                                 f"(one key per step: {hybrid.key_bytes / 1e6:.1f} MB)")
        if cls is None:
            return plan, needed
        # Multi-block plans: every ring deep enough is a candidate; the cheapest predicted one wins.
        sent = sum(key_bytes_as_sent(params, lv) for lv in plan.key_levels["galois"].values())
        sent += key_bytes_as_sent(params, plan.key_levels["relin"]) if plan.key_levels["relin"] >= 0 else 0
        candidates.append((plan_ms(plan), sent, n, plan, needed))
        if poly_degree is not None or prime_bits is not None:
            break
    if not candidates:
        if too_big and needed is not None:
            raise PlanError(too_big)
        return None, needed
    ms, sent, n, plan, needed = min(candidates, key=lambda c: (c[0], c[1]))
    others = "; ".join([f"N={c[2]} {c[0] / 1e3:.1f} s, keys {c[1] / 1e6:.0f} MB" for c in candidates
                        if c[3] is not plan] + skipped)
    plan.choices.append(f"ring N={n} (depth {needed}): predicted {ms / 1e3:.1f} s; {len(plan.rotation_steps)} keys, "
                        f"{sent / 1e6:.1f} MB as sent "
                        + (f"(budget {max_key_bytes / 1e6:.0f} MB: rotations composed from fewer keys)"
                           if plan.key_paths else f"(within the {max_key_bytes / 1e6:.0f} MB budget)")
                        + (", over budget even so" if sent > max_key_bytes else "")
                        + (f" (rejected: {others})" if others else ""))
    return plan, needed


def _may_fit_one_ciphertext(model: nn.Module, input_shape: tuple[int, ...], activation_ranges: Any,
                            slots: int) -> bool:
    """False when an activation's (or a product's) input is larger than ``slots``: such a value survives every
    folding, so no one-ciphertext plan exists, and folding that graph (a pool into a 3x3 conv at 256 px makes
    tens of millions of products) would only cost memory."""
    graph = trace(model, input_shape, activation_ranges, fold=False)
    return all(packing.next_pow2(n.size) <= slots for n in graph.nodes if n.op in ("poly", "mul", "add"))


def _depth_lower_bound(graph: Graph, forms: dict[int, PolyForm]) -> int:
    """Levels the longest path of the graph needs at least (linear 1, square 1, cubic 2, product 1, a cubic gate
    and its product 2; rescalings to match a residual's operands not counted)."""
    depth = [0] * len(graph.nodes)
    gates = {n.inputs[1] for n in graph.nodes if n.op == "mul"}
    for i, node in enumerate(graph.nodes):
        ins = [depth[k] for k in node.inputs]
        if node.op == "linear":
            depth[i] = ins[0] + 1
        elif node.op == "poly":
            cubic = forms[i].degree == 3 if i in forms else len(node.coeffs) > 3
            depth[i] = ins[0] + (0 if cubic and i in gates else 2 if cubic else 1)
        elif node.op == "mul":
            gate = graph.nodes[node.inputs[1]]
            depth[i] = max(ins) + (2 if gate.op == "poly" and len(gate.coeffs) > 3 else 1)
        elif node.op == "add":
            depth[i] = max(ins)
    return max(depth)


def _lower(graph: Graph, forms: dict[int, PolyForm], slots: int, primes: list[int], scale: float, top: int,
           output_scale: float | None, pack_input: bool = False, clean_output: bool = True,
           cls: Any = None) -> _Lowering:
    low = (cls or _Lowering)(graph, forms, slots, primes, scale, top)
    low.output_scale = output_scale or scale
    low.pack_only = pack_input
    low.clean_output = clean_output
    try:
        low.run()
    except _TooDeep:
        raise PlanError("internal: the plan ran out of levels while lowering; report this model") from None
    return low
