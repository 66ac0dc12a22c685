"""Executes a compiled CKKS program against a ``Backend``: the interpreter every backend shares.

The plan fixes every level, scale and rotation; this module only walks its instructions. Key levels come from the
plan (``Plan.key_levels``), never from here. The debug helper reuses :func:`run_program` with a hook that sees
every register.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from medhe.errors import PlanError
from medhe.he.ckks.backends.base import Backend

if TYPE_CHECKING:
    from medhe.he.ckks.compiler.program import Plan


def run_program(plan: Plan, be: Backend, plains: list[Any], inputs: list[Any],
                hook: Callable[[int, Any], None] | None = None, hoist: bool = False) -> Any:
    """Evaluate ``plan`` on encrypted ``inputs`` (one per input ciphertext); returns the output ciphertext.

    ``hoist``: a multi-block layer's baby rotations of one input block share one decomposition on backends that
    offer ``rotate_hoisted`` (native; results decrypt alike but are not SEAL's bits)."""
    regs: dict[int, Any] = dict(zip(range(len(inputs)), inputs))
    w = _Weights(be, plains)
    multi = getattr(plan, "node_blocks", None) is not None
    shared: dict[tuple[int, int], Any] = {}  # multi-block: (register, baby) -> rotated block, shared by a layer
    last = _last_reads(plan) if multi else {}
    last_rotation = _last_rotations(plan) if multi else {}
    for index, ins in enumerate(plan.instrs):
        if ins.op == "linear" and multi:
            out = _block_linear(be, ins, regs, w, plan.key_path, shared,
                                hoist and hasattr(be, "rotate_hoisted"))
        elif ins.op == "linear":
            out = _linear(be, ins, [regs[s] for s in ins.srcs], w, plan.key_path)
        elif ins.op == "poly2":
            u = regs[ins.srcs[0]]
            v = w.add(be.negate(u) if ins.sign < 0 else u, ins.consts["beta"])
            out = be.rescale(be.relinearize(be.multiply(u, v)))
            if "c" in ins.consts:
                out = w.add(out, ins.consts["c"])
        elif ins.op == "poly3":
            u = regs[ins.srcs[0]]
            t = w.add(u, ins.consts["th"])
            w2 = be.rescale(be.relinearize(be.multiply(t, t)))
            z = w.add(w2, ins.consts["kz"])
            out = be.rescale(be.relinearize(be.multiply(z, be.mod_switch(u, be.level(z)))))
            if ins.sign < 0:
                out = be.negate(out)
            if "c" in ins.consts:
                out = w.add(out, ins.consts["c"])
        elif ins.op == "gate3":
            x, u = regs[ins.srcs[0]], regs[ins.srcs[1]]
            level = be.level(u)
            xp = be.rescale(be.relinearize(be.multiply(be.mod_switch(x, level), u)))
            t = w.add(u, ins.consts["th"])
            z = w.add(be.rescale(be.relinearize(be.multiply(t, t))), ins.consts["kz"])
            out = be.rescale(be.relinearize(be.multiply(xp, z)))
            if ins.sign < 0:
                out = be.negate(out)
            if "c" in ins.consts:
                be.add_inplace(out, be.rescale(w.relin(w.mul(be.mod_switch(x, level - 1), ins.consts["c"]))))
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
        if multi:  # drop blocks and rotated blocks nothing reads any more: K blocks per value add up
            for reg in last.get(index, ()):
                if reg != plan.output_register:
                    regs.pop(reg, None)
            for key in last_rotation.get(index, ()):
                shared.pop(key, None)
    return regs[plan.output_register]


def _last_reads(plan: Plan) -> dict[int, list[int]]:
    """Instruction index -> registers read for the last time there."""
    last: dict[int, int] = {}
    for index, ins in enumerate(plan.instrs):
        for reg in ins.srcs:
            last[reg] = index
    out: dict[int, list[int]] = {}
    for reg, index in last.items():
        out.setdefault(index, []).append(reg)
    return out


def _last_rotations(plan: Plan) -> dict[int, list[tuple[int, int]]]:
    """Instruction index -> (register, baby) rotations read for the last time there (an output block reads only
    the input blocks near it, so most rotated blocks can go long before the layer ends)."""
    last: dict[tuple[int, int], int] = {}
    for index, ins in enumerate(plan.instrs):
        if ins.op == "linear":
            for _, terms in ins.groups:
                for src, baby, _ in terms:
                    if baby:
                        last[(ins.srcs[src], baby)] = index
    out: dict[int, list[tuple[int, int]]] = {}
    for key, index in last.items():
        out.setdefault(index, []).append(key)
    return out


def _block_linear(be: Backend, ins, regs: dict[int, Any], w: "_Weights", key_path: Callable[[int], list[int]],
                  shared: dict[tuple[int, int], Any], hoist: bool = False) -> Any:
    """One output block of a multi-block linear map: terms (source, baby, plaintext) per giant step; each source's
    baby rotations are made once and kept for the other output blocks of the layer."""
    if hoist:  # every missing one-key baby rotation of a source in one call
        missing: dict[int, list[int]] = {}
        for _, terms in ins.groups:
            for src, baby, _ in terms:
                reg = ins.srcs[src]
                if baby and (reg, baby) not in shared and len(key_path(baby)) == 1 and baby not in missing.get(reg, []):
                    missing.setdefault(reg, []).append(baby)
        for reg, babies in missing.items():
            if len(babies) > 1:
                for baby, ct in zip(babies, be.rotate_hoisted(regs[reg], [key_path(b)[0] for b in babies])):
                    shared[(reg, baby)] = ct

    def rotated(src: int, baby: int) -> Any:
        reg = ins.srcs[src]
        if not baby:
            return regs[reg]
        key = (reg, baby)
        if key not in shared:
            shared[key] = _rotate(be, regs[reg], baby, key_path)
        return shared[key]

    return _sum_terms(be, ins, rotated, w, key_path)


def _sum_terms(be: Backend, ins, operand: Callable[[int, int], Any], w: "_Weights",
               key_path: Callable[[int], list[int]]) -> Any:
    """The giant-step sum every linear instruction ends with; ``operand(src, baby)`` supplies the rotated input."""
    total = None
    for giant, terms in ins.groups:
        acc = None
        for src, baby, pt in terms:
            prod = w.mul(operand(src, baby), pt)
            if acc is None:
                acc = prod
            else:
                be.add_inplace(acc, prod)
        acc = be.rescale(w.relin(acc))
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
        total = w.add(total, ins.consts["bias"])
    return total


def _rotate(be: Backend, ct: Any, step: int, key_path: Callable[[int], list[int]]) -> Any:
    for key_step in key_path(step):
        ct = be.rotate(ct, key_step)
    return ct


class _Weights:
    """The plan's weight operands: plaintexts (the default), or ciphertexts under the client's key when the
    container says ``encrypted`` (P3's encrypted model, ``ckks.encrypted``). Then every product is ciphertext x
    ciphertext, and each accumulated sum of products is relinearized once, before its rescale or rotation; all of
    it through the ``Backend`` interface (multiply, relinearize, rescale), so every backend runs it."""

    def __init__(self, be: Backend, plains: Any) -> None:
        self.be, self.plains = be, plains
        self.encrypted = bool(getattr(plains, "encrypted", False))

    def mul(self, ct: Any, index: int) -> Any:
        if self.encrypted:
            return self.be.multiply(ct, self.plains[index])
        return self.be.multiply_plain(ct, self.plains[index])

    def add(self, ct: Any, index: int) -> Any:
        if self.encrypted:
            return self.be.add(ct, self.plains[index])
        return self.be.add_plain(ct, self.plains[index])

    def relin(self, ct: Any) -> Any:
        return self.be.relinearize(ct) if self.encrypted else ct


def _linear(be: Backend, ins, xs: list[Any], w: _Weights, key_path: Callable[[int], list[int]]) -> Any:
    rotated = {0: xs[0]}
    if len(xs) == 1:
        for b in ins.babies:
            if b:
                rotated[b] = _rotate(be, xs[0], b, key_path)
    return _sum_terms(be, ins, lambda src, baby: xs[src] if len(xs) > 1 else rotated[baby], w, key_path)


def _default_cache_bytes() -> int:
    """An eighth of the host's memory, clamped to 1-4 GiB: deep models' weights (2-3 GB encoded at N=32768) stay
    encoded and run in one native call on a typical server, while one model cannot take a small host's memory."""
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = 8 << 30
    return int(min(4 << 30, max(1 << 30, host // 8)))


# encoded weights kept in memory; beyond this they are encoded on use (MEDHE_PLAINTEXT_CACHE_MB overrides)
PLAINTEXT_CACHE_BYTES = (int(os.environ["MEDHE_PLAINTEXT_CACHE_MB"]) << 20 if os.environ.get("MEDHE_PLAINTEXT_CACHE_MB")
                         else _default_cache_bytes())


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
        sizes = [(p.level + 1) * n * 8 for p in self.specs]
        order: Any = range(len(self.specs))
        if sum(sizes) > budget_bytes:  # keep the plaintexts used most often (multi-block plans share many)
            uses = [0] * len(self.specs)
            for ins in plan.instrs:
                for _, terms in ins.groups:
                    for _, _, pt in terms:
                        uses[pt] += 1
                for pt in ins.consts.values():
                    uses[pt] += 1
            order = sorted(range(len(self.specs)), key=lambda i: -uses[i] / sizes[i])
        used = 0
        for i in order:
            if used + sizes[i] > budget_bytes:
                continue
            p = self.specs[i]
            self.cache[i] = backend.encode(p.values, p.level, p.scale)
            used += sizes[i]
        self.cached_bytes = used

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> Any:
        hit = self.cache.get(index)
        if hit is not None:
            return hit
        p = self.specs[index]
        return self.backend.encode(p.values, p.level, p.scale)
