"""Lowering for models whose values do not fit one ciphertext: every IR node maps to a list of registers (blocks).

Used only when no secure ring holds the model's largest value in one ciphertext, so every one-ciphertext plan stays
exactly as ``lower._Lowering`` makes it. Values that fit one ciphertext (a squeeze-excite vector, the logits, a small
input) keep the one-ciphertext strategies; image maps on multi-block values pick, per layer, the channel placement
(``blocks.image_layouts``) with the lowest predicted cost; flat maps from multi-block values use the block hybrid
method. The client always sends the input packed (``blocks.packed_layout``): an im2col of a value this large would
cost many times the input budget.
"""

from __future__ import annotations

import hashlib

import numpy as np

from medhe.errors import PlanError
from medhe.he.ckks.compiler import blocks, packing
from medhe.he.ckks.compiler.cost import op_ms
from medhe.he.ckks.compiler.lower import _Lowering, _TooDeep
from medhe.he.ckks.compiler.packing import Layout
from medhe.he.ckks.compiler.program import Instr, Register
from medhe.he.ckks.compiler.trace import Node

def predicted_ms(rotations: int, products: int, poly_degree: int, level: int) -> float:
    """Rotations, plaintext products and the encoding of each product's weights, at the layer's level."""
    return (rotations * op_ms("rotation", poly_degree, level)
            + products * (op_ms("product", poly_degree, level) + op_ms("encode", poly_degree, level)))


class BlockLowering(_Lowering):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.node_blocks: dict[int, list[int]] = {}
        self.deferred_blocks: dict[int, list[int]] = {}
        self.choices: list[str] = []
        self.unique_plains: dict[tuple, int] = {}

    def plain(self, values, level: int, scale: float) -> int:
        """One plaintext per distinct (vector, level, scale): a conv's diagonals repeat in every block of a channel
        (same weights, same padding pattern), so the server encodes and keeps each once."""
        if np.isscalar(values):
            return super().plain(values, level, scale)
        vec = np.ascontiguousarray(values)
        key = (level, float(scale), vec.dtype.str, hashlib.blake2b(vec.tobytes(), digest_size=20).digest())
        hit = self.unique_plains.get(key)
        if hit is not None and np.array_equal(self.plains[hit].values, vec):
            return hit
        index = super().plain(vec, level, scale)
        self.unique_plains[key] = index
        return index

    # -- helpers
    def reg(self, layout: Layout, level: int, scale: float, block: int = 0) -> int:
        out = super().reg(layout, level, scale)
        self.registers[out].block = block
        return out

    def multi(self, layout: Layout) -> bool:
        return int(layout.blocks) > 1

    def run(self) -> None:
        g = self.graph
        self.pack_input()
        self.node_blocks[0] = [self.node_reg[0]] if self.gather.shape[0] == 1 else list(range(self.gather.shape[0]))
        for i, node in enumerate(g.nodes[1:], start=1):
            if node.op == "linear":
                regs = self.lower_linear_blocks(node, i)
            elif node.op == "poly":
                regs = self.per_block(node, i, self.lower_poly)
            elif node.op == "mul" and node.inputs[1] in self.deferred_blocks:
                regs = self.gate_blocks(node, i)
            elif node.op in ("mul", "add"):
                regs = self.pair_blocks(node, i)
            else:  # pragma: no cover
                raise PlanError(f"unknown IR op {node.op!r}")
            self.node_blocks[i] = regs
            self.node_reg[i] = regs[0] if regs else -1
        if len(self.node_blocks[len(g.nodes) - 1]) != 1:
            raise PlanError("the model's output does not fit one ciphertext: end it with a Linear layer "
                            f"(at most {self.slots} outputs)")

    def pack_input(self) -> None:
        shape = self.graph.input_shape
        if packing.next_pow2(int(np.prod(shape))) <= self.slots:
            super().pack_input()
            return
        layout = blocks.packed_layout(shape, self.slots)
        self.gather = blocks.input_gather(layout, self.slots)
        for k in range(layout.blocks):
            self.reg(layout, self.top, self.input_scale, k)
        self.node_reg[0] = 0

    # -- element-wise ops, block by block
    def per_block(self, node: Node, i: int, lower) -> list[int]:
        src = node.inputs[0]
        outs = []
        deferred = []
        for reg in self.node_blocks[src]:
            self.node_reg[src] = reg
            out = lower(node, i)
            if out == -1:
                deferred.append(self.deferred_gates.pop(i))
            else:
                self.registers[out].block = self.registers[reg].block
                outs.append(out)
        self.node_reg[src] = self.node_blocks[src][0]
        if deferred:
            self.deferred_blocks[i] = deferred
        return outs

    def _blocks_alike(self, a: list[int], b: list[int], name: str) -> None:
        la, lb = self.registers[a[0]].layout, self.registers[b[0]].layout
        if len(a) != len(b) or (len(a) > 1 and not np.array_equal(la.slots, lb.slots)):
            raise PlanError(f"layer {name!r}: its operands are laid out differently across ciphertexts; "
                            "multi-ciphertext plans support this only when the second operand is a linear map")

    def pair_blocks(self, node: Node, i: int) -> list[int]:
        a, b = node.inputs
        ra, rb = self.node_blocks[a], self.node_blocks[b]
        self._blocks_alike(ra, rb, node.name)
        if len(ra) == 1:
            self.node_reg[a], self.node_reg[b] = ra[0], rb[0]
            return [self.lower_mul(node, i) if node.op == "mul" else self.lower_add(node, i)]
        outs = []
        for x, y in zip(ra, rb):
            self.node_reg[a], self.node_reg[b] = x, y
            out = self.lower_mul(node, i) if node.op == "mul" else self.lower_add(node, i)
            if self.registers[out].layout is not self.registers[x].layout:
                self.registers[out].layout = self.registers[x].layout
            self.registers[out].block = self.registers[x].block
            outs.append(out)
        return outs

    def gate_blocks(self, node: Node, i: int) -> list[int]:
        x_node, gate = node.inputs
        rx, ru = self.node_blocks[x_node], self.deferred_blocks[gate]
        self._blocks_alike(rx, ru, node.name)
        outs = []
        for x, u in zip(rx, ru):
            self.node_reg[x_node] = x
            self.deferred_gates[gate] = u
            out = self.lower_gate_mul(node, i)
            self.registers[out].layout = self.registers[x].layout
            self.registers[out].block = self.registers[x].block
            outs.append(out)
        self.deferred_gates.pop(gate, None)
        return outs

    def normalize(self, src: int, want: Layout | None, name: str) -> int:
        """One block back at the standard scale (a residual's operands): its slots times one, one level down."""
        reg = self.registers[src]
        if not self.multi(reg.layout):
            return super().normalize(src, want, name)
        if want is not None and not np.array_equal(want.slots, reg.layout.slots):
            raise PlanError(f"layer {name!r}: re-laying out a value across ciphertexts is not supported")
        if reg.level < 1:
            raise _TooDeep()
        mask = np.zeros(self.slots)
        mine = reg.layout.slots // self.slots == reg.block
        mask[reg.layout.slots[mine] % self.slots] = 1.0
        pt = self.plain(mask, reg.level, self.primes[reg.level] * self.scale / reg.scale)
        out = self.reg(reg.layout, reg.level - 1, self.scale, reg.block)
        self.instrs.append(Instr("linear", out, (src,), name, babies=[0], groups=[(0, [(0, 0, pt)])], node=-1))
        return out

    def _match_layouts(self, a: int, b: int, name: str):
        la, lb = self.registers[a].layout, self.registers[b].layout
        if self.multi(la) or self.multi(lb):
            return a, b, la
        return super()._match_layouts(a, b, name)

    # -- linear maps
    def lower_linear_blocks(self, node: Node, i: int) -> list[int]:
        srcs = self.node_blocks[node.inputs[0]]
        inp = self.registers[srcs[0]].layout
        want = None
        if i in self.requests and self.requests[i] in self.node_blocks:
            want = self.registers[self.node_blocks[self.requests[i]][0]].layout
        fits = packing.next_pow2(node.size) <= self.slots
        if not self.multi(inp) and fits and (want is None or not self.multi(want)):
            self.node_reg[node.inputs[0]] = srcs[0]
            out = self.lower_linear(node, i)
            self.choices.append(f"{node.name}: one ciphertext ({self.strategies[-1].split(':')[-1]})")
            return [out]
        if want is not None:
            low = blocks.lower_blocks(node.matrix, inp, want, self.slots)
            self.choices.append(f"{node.name}: {want.blocks} blocks, the layout of its other operand")
        elif len(node.shape) == 3:
            stride = node.stride if len(self.graph.nodes[node.inputs[0]].shape) == 3 else None
            cands = blocks.image_layouts(inp, node.shape, stride, self.slots) if inp.grid is not None else []
            if not cands:
                cands = [("packed", blocks.packed_layout(node.shape, self.slots))]
            scored = []
            for name, lay in cands:
                rot, prods = blocks.pair_stats(node.matrix, inp, lay, self.slots)
                level = self.registers[srcs[0]].level
                scored.append((predicted_ms(rot, prods, 2 * self.slots, level), name, lay, rot, prods))
            best = min(scored, key=lambda t: t[0])
            low = blocks.lower_blocks(node.matrix, inp, best[2], self.slots)
            others = ", ".join(f"{n} {ms / 1e3:.1f}s" for ms, n, *_ in scored if n != best[1])
            self.choices.append(f"{node.name}: {best[1]} layout, {best[2].blocks} blocks, {best[3]} rotations, "
                                f"{best[4]} products (rotations before key-path composition), "
                                f"predicted {best[0] / 1e3:.1f}s"
                                + (f" (rejected: {others})" if others else ""))
        elif fits:
            low = blocks.lower_block_hybrid(node.matrix, inp, self.slots)
            self.choices.append(f"{node.name}: block hybrid over {len(srcs)} blocks -> one ciphertext")
        else:
            raise PlanError(f"layer {node.name!r}: a flat value of {node.size} elements does not fit one "
                            f"ciphertext ({self.slots} slots); add pooling before the dense layers")
        return self.emit_blocks(node, i, srcs, low)

    def emit_blocks(self, node: Node, i: int, srcs: list[int], low: blocks.BlockLowered) -> list[int]:
        level, target, pt_scale = self.linear_scales(srcs[0], i)
        layout = low.layout
        g_step = low.giant
        bias = node.bias if node.bias is not None and np.any(node.bias) else None
        outs: dict[int, int] = {}
        # Output blocks in the order of the input blocks they read last: each input block's rotations can then be
        # dropped soon after (channel groups of one spatial part run together instead of part after part per group).
        order = sorted(range(len(low.terms)), key=lambda k: (max((bi for bi, _ in low.terms[k]), default=0), k))
        for bo in order:
            terms = low.terms[bo]
            used = sorted({bi for bi, _ in terms})
            index = {bi: k for k, bi in enumerate(used)}
            groups: dict[int, list[tuple[int, int, int]]] = {}
            babies: set[int] = set()
            for (bi, d), vec in sorted(terms.items()):
                if not np.any(vec):
                    continue
                b = d % g_step
                giant = d - b
                babies.add(b)
                groups.setdefault(giant, []).append((index[bi], b, self.plain(np.roll(vec, giant), level, pt_scale)))
            in_regs = tuple(srcs[b] for b in used) or (srcs[0],)
            if not groups:
                groups[0] = [(0, 0, self.plain(np.zeros(self.slots), level, pt_scale))]
                babies.add(0)
            out = self.reg(layout, level - 1, target, bo)
            consts = {}
            if bias is not None:
                vec = np.zeros(self.slots)
                if layout.replicated:
                    for k in range(self.slots // layout.period):
                        vec[layout.slots + k * layout.period] = bias
                else:
                    mine = layout.slots // self.slots == bo
                    vec[layout.slots[mine] % self.slots] = bias[mine]
                if np.any(vec):
                    consts["bias"] = self.plain(vec, level - 1, target)
            self.instrs.append(Instr("linear", out, in_regs, node.name, babies=sorted(babies),
                                     groups=sorted(groups.items()), reduce=list(low.reduce), consts=consts,
                                     node=i))
            outs[bo] = out
        self.strategies.append(f"{node.name}:{low.strategy}x{len(outs)}")
        return [outs[bo] for bo in range(len(low.terms))]


__all__ = ["BlockLowering", "Register", "predicted_ms"]
