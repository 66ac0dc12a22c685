"""Lowers a compiled ``Plan`` to the native runtime's flat op list, once at load time.

The lowering runs the real interpreter (``run_program``) on a recording backend, so the op stream is exactly the
one every other backend executes; then it rewrites it: rotations of one source share a decomposition
(``ROTATE_MANY``), a register that accumulates rotated ciphertexts gets them with a single division by the
special prime (``ROTATE_SUM``), and sums of plaintext products accumulate in place (``MUL_PLAIN_SUM``, exact).
``hoist=False`` keeps only the exact rewrites, so a run is bit-identical to seal-python's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medhe.errors import PlanError

ADD, ADD_INPLACE, NEGATE, ADD_PLAIN, MUL_PLAIN, MUL, RELIN, RESCALE, MOD_SWITCH, ROTATE, ROTATE_MANY, ROTATE_SUM, \
    MUL_PLAIN_SUM, COPY = range(14)


@dataclass
class _Op:
    code: int
    dst: int = -1
    a: int = -1
    b: int = -1
    arg: int = 0
    srcs: tuple = ()
    dsts: tuple = ()
    plains: tuple = ()
    elts: tuple = ()

    def reads(self) -> list[int]:
        out = [r for r in (self.a, self.b) if r >= 0]
        return out + list(self.srcs)

    def writes(self) -> list[int]:
        return ([self.dst] if self.dst >= 0 else []) + list(self.dsts)

    def tuple(self, frees: list[int]) -> tuple:
        return (self.code, self.dst, self.a, self.b, int(self.arg), list(self.srcs), list(self.dsts),
                list(self.plains), [int(e) for e in self.elts], frees)


class _Reg:
    __slots__ = ("id", "level", "scale", "size")

    def __init__(self, rid: int, level: int, scale: float, size: int = 2) -> None:
        self.id, self.level, self.scale, self.size = rid, level, scale, size


class _PlainRef:
    __slots__ = ("index", "level", "scale")

    def __init__(self, index: int, level: int, scale: float) -> None:
        self.index, self.level, self.scale = index, level, scale


class _PlainRefs:
    def __init__(self, plan) -> None:
        self.refs = [_PlainRef(i, p.level, p.scale) for i, p in enumerate(plan.plains)]

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> _PlainRef:
        return self.refs[i]


class Recorder:
    """A Backend look-alike whose ciphertexts are register numbers: it records what the interpreter does."""

    def __init__(self, primes: list[int], galois_element) -> None:
        self.primes = primes
        self.galois_element = galois_element
        self.ops: list[_Op] = []
        self.count = 0

    def new(self, level: int, scale: float, size: int = 2) -> _Reg:
        reg = _Reg(self.count, level, scale, size)
        self.count += 1
        return reg

    def _emit(self, code: int, a: _Reg, out: _Reg, **kw) -> _Reg:
        self.ops.append(_Op(code, out.id, a.id, **kw))
        return out

    def add(self, a, b):
        return self._emit(ADD, a, self.new(a.level, a.scale, max(a.size, b.size)), b=b.id)

    def add_inplace(self, a, b) -> None:
        self.ops.append(_Op(ADD_INPLACE, a.id, a.id, b.id))
        a.size = max(a.size, b.size)

    def add_plain(self, a, p):
        return self._emit(ADD_PLAIN, a, self.new(a.level, a.scale, a.size), arg=p.index)

    def negate(self, a):
        return self._emit(NEGATE, a, self.new(a.level, a.scale, a.size))

    def multiply_plain(self, a, p):
        return self._emit(MUL_PLAIN, a, self.new(a.level, a.scale * p.scale, a.size), arg=p.index)

    def multiply(self, a, b):
        return self._emit(MUL, a, self.new(a.level, a.scale * b.scale, 3), b=b.id)

    def relinearize(self, a):
        return self._emit(RELIN, a, self.new(a.level, a.scale, 2))

    def rescale(self, a):
        return self._emit(RESCALE, a, self.new(a.level - 1, a.scale / self.primes[a.level], a.size))

    def rotate(self, a, step: int):
        return self._emit(ROTATE, a, self.new(a.level, a.scale), arg=self.galois_element(int(step)))

    def conjugate(self, a):
        return self._emit(ROTATE, a, self.new(a.level, a.scale), arg=self.galois_element(0))

    def mod_switch(self, a, level: int):
        if a.level == level:
            return a
        if level > a.level:
            raise PlanError("the plan switches a ciphertext up a level")
        return self._emit(MOD_SWITCH, a, self.new(level, a.scale, a.size), arg=level)

    def level(self, ct) -> int:
        return ct.level

    def scale(self, ct) -> float:
        return ct.scale


def _single_use(ops: list[_Op]) -> dict[int, list[int]]:
    uses: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for r in op.reads():
            uses.setdefault(r, []).append(i)
    return uses


def _untouched(ops: list[_Op], regs: set[int], start: int, end: int, skip: set[int]) -> bool:
    """No op in (start, end) outside ``skip`` writes any of ``regs``."""
    for k in range(start + 1, end):
        if k not in skip and any(w in regs for w in ops[k].writes()):
            return False
    return True


def _fuse_sums(ops: list[_Op], producer: int, min_terms: int) -> list[_Op]:
    """``T = f(x0); T += f(x1); T += f(x2) ...`` (each f(x_g) used once) -> one fused op at the last add.

    ``producer``: MUL_PLAIN (-> MUL_PLAIN_SUM) or ROTATE (-> ROTATE_SUM; T's first value may be any register).
    """
    uses = _single_use(ops)
    defined = {w: i for i, op in enumerate(ops) for w in op.writes() if op.code != ADD_INPLACE}
    # pairs: add index -> producer index
    chains: dict[int, list[tuple[int, int]]] = {}
    for j, op in enumerate(ops):
        if op.code != ADD_INPLACE or op.a == op.b:
            continue
        d = defined.get(op.b)
        if d is None or ops[d].code != producer or uses.get(op.b) != [j] or ops[d].a == op.a:
            continue
        chains.setdefault(op.a, []).append((j, d))
    removed: set[int] = set()
    replace: dict[int, _Op] = {}
    for target, pairs in chains.items():
        # split into runs where nothing else touches the target between consecutive adds
        runs, cur = [], [pairs[0]]
        for prev, nxt in zip(pairs, pairs[1:]):
            between = range(prev[0] + 1, nxt[0])
            clean = all(target not in ops[k].reads() and target not in ops[k].writes() for k in between
                        if k != nxt[1])
            if clean:
                cur.append(nxt)
            else:
                runs.append(cur)
                cur = [nxt]
        runs.append(cur)
        for run in runs:
            first_def = defined.get(target)
            terms = []  # (src, elt or plain)
            start = run[0][0]
            head_op = ops[first_def] if first_def is not None else None
            absorb_head = (head_op is not None and head_op.code == producer and first_def < start
                           and uses.get(target, [None])[0] == run[0][0]
                           and all(target not in ops[k].reads() for k in range(first_def + 1, start)))
            if absorb_head:
                terms.append((head_op.a, head_op.elts[0] if head_op.elts else head_op.arg))
            elif producer == MUL_PLAIN:
                continue  # a plain-product sum needs its first product to start from
            else:
                terms.append((target, 1))
            for _j, d in run:
                terms.append((ops[d].a, ops[d].arg))
            if len(terms) < min_terms:
                continue
            end = run[-1][0]
            srcs = {s for s, _ in terms}
            skip = {j for j, _ in run} | {d for _, d in run}
            lo = first_def if absorb_head else start
            if not _untouched(ops, srcs - {target}, lo, end, skip):
                continue
            if producer == MUL_PLAIN:
                fused = _Op(MUL_PLAIN_SUM, target, srcs=tuple(s for s, _ in terms),
                            plains=tuple(int(p) for _, p in terms))
            else:
                fused = _Op(ROTATE_SUM, target, srcs=tuple(s for s, _ in terms), elts=tuple(int(e) for _, e in terms))
            removed |= skip
            if absorb_head:
                removed.add(first_def)
            replace[end] = fused
            removed.discard(end)
    out = []
    for i, op in enumerate(ops):
        if i in replace:
            out.append(replace[i])
        elif i not in removed:
            out.append(op)
    return out


def _hoist_rotations(ops: list[_Op]) -> list[_Op]:
    """Rotations of one unchanged source -> one ROTATE_MANY (a shared decomposition) at the first of them."""
    out, taken = [], set()
    for i, op in enumerate(ops):
        if i in taken:
            continue
        if op.code != ROTATE:
            out.append(op)
            continue
        group = [i]
        for k in range(i + 1, len(ops)):
            other = ops[k]
            if op.a in other.writes():
                break
            if other.code == ROTATE and other.a == op.a and k not in taken:
                group.append(k)
        if len(group) == 1:
            out.append(op)
            continue
        taken.update(group)
        out.append(_Op(ROTATE_MANY, a=op.a, dsts=tuple(ops[k].dst for k in group),
                       elts=tuple(ops[k].arg for k in group)))
    return out


@dataclass
class Lowered:
    ops: list[tuple]
    registers: int
    inputs: int
    output: int

    def counts(self) -> dict[str, int]:
        names = ["add", "add_inplace", "negate", "add_plain", "mul_plain", "mul", "relin", "rescale", "mod_switch",
                 "rotate", "rotate_many", "rotate_sum", "mul_plain_sum", "copy"]
        out: dict[str, int] = {}
        for op in self.ops:
            out[names[op[0]]] = out.get(names[op[0]], 0) + 1
        return out


def lower(plan, primes: list[int], galois_element, hoist: bool | str = True) -> Lowered:
    """The plan's op stream for the native runtime (registers 0..inputs-1 are the input ciphertexts).

    ``hoist``: True / "all" (shared mod-downs and shared decompositions), "sum" or "many" (one of them), False /
    "none" (exact: the run is bit-identical to seal-python's).
    """
    from medhe.he.ckks.runtime import run_program

    rec = Recorder(primes, galois_element)
    inputs = [rec.new(plan.input_level, plan.input_scale) for _ in range(plan.input_ciphertexts)]
    out = run_program(plan, rec, _PlainRefs(plan), inputs)
    ops = _fuse_sums(rec.ops, MUL_PLAIN, 2)
    mode = {True: "all", False: "none"}.get(hoist, hoist)
    if mode not in ("none", "sum", "many", "all"):
        raise PlanError(f"unknown hoisting mode {hoist!r}: use none, sum, many or all")
    if mode in ("all", "sum"):
        ops = _fuse_sums(ops, ROTATE, 2)
    if mode in ("all", "many"):
        ops = _hoist_rotations(ops)
    last: dict[int, int] = {}
    for i, op in enumerate(ops):
        for r in op.reads() + op.writes():
            last[r] = i
    frees: dict[int, list[int]] = {}
    for r, i in last.items():
        if r != out.id:
            frees.setdefault(i, []).append(r)
    # a register written but never read is freed right after its op
    return Lowered([op.tuple(sorted(frees.get(i, []))) for i, op in enumerate(ops)], rec.count, len(inputs), out.id)


def compile_program(backend, plan, plains: list[Any], hoist: bool | str = True):
    """A ``_runtime.Program`` for ``plan`` on ``backend`` (a NativeBackend); ``plains``: the runtime plaintexts."""
    lowered = lower(plan, list(backend.ctx.primes), backend.galois_element, hoist)
    return backend.ctx.program(lowered.ops, plains, lowered.registers, lowered.inputs, lowered.output), lowered
