"""Executes a compiled CKKS program against a ``Backend``: the interpreter every backend shares.

The plan fixes every level, scale and rotation; this module only walks its instructions. Key levels come from the
plan (``Plan.key_levels``), never from here. The debug helper reuses :func:`run_program` with a hook that sees
every register.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from medhe.errors import PlanError
from medhe.he.ckks.backends.base import Backend

if TYPE_CHECKING:
    from medhe.he.ckks.compiler.program import Plan


def run_program(plan: Plan, be: Backend, plains: list[Any], inputs: list[Any],
                hook: Callable[[int, Any], None] | None = None) -> Any:
    """Evaluate ``plan`` on encrypted ``inputs`` (one per input ciphertext); returns the output ciphertext."""
    regs: dict[int, Any] = dict(zip(range(len(inputs)), inputs))
    for ins in plan.instrs:
        if ins.op == "linear":
            out = _linear(be, ins, [regs[s] for s in ins.srcs], plains, plan.key_path)
        elif ins.op == "poly2":
            u = regs[ins.srcs[0]]
            v = be.add_plain(be.negate(u) if ins.sign < 0 else u, plains[ins.consts["beta"]])
            out = be.rescale(be.relinearize(be.multiply(u, v)))
            if "c" in ins.consts:
                out = be.add_plain(out, plains[ins.consts["c"]])
        elif ins.op == "poly3":
            u = regs[ins.srcs[0]]
            w = be.add_plain(u, plains[ins.consts["th"]])
            w2 = be.rescale(be.relinearize(be.multiply(w, w)))
            z = be.add_plain(w2, plains[ins.consts["kz"]])
            out = be.rescale(be.relinearize(be.multiply(z, be.mod_switch(u, be.level(z)))))
            if ins.sign < 0:
                out = be.negate(out)
            if "c" in ins.consts:
                out = be.add_plain(out, plains[ins.consts["c"]])
        elif ins.op == "gate3":
            x, u = regs[ins.srcs[0]], regs[ins.srcs[1]]
            level = be.level(u)
            xp = be.rescale(be.relinearize(be.multiply(be.mod_switch(x, level), u)))
            w = be.add_plain(u, plains[ins.consts["th"]])
            z = be.add_plain(be.rescale(be.relinearize(be.multiply(w, w))), plains[ins.consts["kz"]])
            out = be.rescale(be.relinearize(be.multiply(xp, z)))
            if ins.sign < 0:
                out = be.negate(out)
            if "c" in ins.consts:
                be.add_inplace(out, be.rescale(be.multiply_plain(be.mod_switch(x, level - 1),
                                                                 plains[ins.consts["c"]])))
        elif ins.op in ("mul", "add"):
            a, b = regs[ins.srcs[0]], regs[ins.srcs[1]]
            level = min(be.level(a), be.level(b))
            a, b = be.mod_switch(a, level), be.mod_switch(b, level)
            out = be.add(a, b) if ins.op == "add" else be.rescale(be.relinearize(be.multiply(a, b)))
        else:  # pragma: no cover
            raise PlanError(f"unknown CKKS instruction {ins.op!r}")
        regs[ins.dst] = out
        if hook is not None:
            hook(ins.dst, out)
    return regs[plan.output_register]


def _rotate(be: Backend, ct: Any, step: int, key_path: Callable[[int], list[int]]) -> Any:
    for key_step in key_path(step):
        ct = be.rotate(ct, key_step)
    return ct


def _linear(be: Backend, ins, xs: list[Any], plains: list[Any], key_path: Callable[[int], list[int]]) -> Any:
    rotated = {0: xs[0]}
    if len(xs) == 1:
        for b in ins.babies:
            if b:
                rotated[b] = _rotate(be, xs[0], b, key_path)
    total = None
    for giant, terms in ins.groups:
        acc = None
        for src, baby, pt in terms:
            prod = be.multiply_plain(xs[src] if len(xs) > 1 else rotated[baby], plains[pt])
            if acc is None:
                acc = prod
            else:
                be.add_inplace(acc, prod)
        acc = be.rescale(acc)
        if giant:
            acc = _rotate(be, acc, giant, key_path)
        if total is None:
            total = acc
        else:
            be.add_inplace(total, acc)
    for step in ins.reduce:
        be.add_inplace(total, _rotate(be, total, step, key_path))
    if ins.conjugate:  # real part of a complex-packed product (the weights carry the 1/2)
        be.add_inplace(total, be.conjugate(total))
    if "bias" in ins.consts:
        total = be.add_plain(total, plains[ins.consts["bias"]])
    return total


PLAINTEXT_CACHE_BYTES = 1 << 30  # encoded weights kept in memory; beyond this they are encoded on use


class EncodedPlains:
    """The plan's plaintexts, encoded once while they fit the memory budget, otherwise encoded on each use.

    Deep multi-channel models can have thousands of diagonals (a GB or more encoded): a shared server must not
    be pushed out of memory by one model, at the price of slower evaluation for such models.
    """

    def __init__(self, backend: Backend, plan: Plan, budget_bytes: int) -> None:
        self.backend = backend
        self.specs = plan.plains
        n = plan.params.poly_degree
        self.cache: dict[int, Any] = {}
        used = 0
        for i, p in enumerate(self.specs):
            size = (p.level + 1) * n * 8
            if used + size > budget_bytes:
                break
            self.cache[i] = backend.encode(p.values, p.level, p.scale)
            used += size
        self.cached_bytes = used

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> Any:
        hit = self.cache.get(index)
        if hit is not None:
            return hit
        p = self.specs[index]
        return self.backend.encode(p.values, p.level, p.scale)
