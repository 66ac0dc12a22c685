"""Slot layouts and the lowering of one linear map onto CKKS slots.

Every linear IR node becomes ``reduce(sum_d diag_d * rot(x, d))``: a set of plaintext diagonals, evaluated with
baby-step/giant-step rotations, followed by an optional rotate-and-sum. Which slots hold which tensor element (the
*layout*) decides how many diagonals and rotations that takes, so each strategy below picks an output layout that
keeps the map cheap:

* ``gather`` (first layer only): the client lays its input out so that each ciphertext already holds, per output
  slot, the pixel that one kernel tap needs (im2col). The server multiplies and sums; rotations only merge the
  blocks several taps share in one ciphertext. The gather map is architecture-only (public), never weights.
* ``direct``: output on the input's (strided) grid, for convolutions, pooling, BN and channel broadcasts:
  a k x k convolution is k*k diagonals per channel shift, padding and stride are zeros in the diagonals.
* ``hybrid``: dense layers on a replicated input (Halevi-Shoup hybrid method): q diagonals, then log2(P/q)
  rotate-and-sum steps; replicas let different output rows share the same diagonals.
* ``box``: small dense layers on a sparse box-shaped input: one diagonal per output plus a box sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


@dataclass
class Layout:
    """Where each element of a value lives in the slot vector.

    ``slots[e]`` is element e's slot in the first copy. When ``replicated`` the vector repeats every ``period``
    slots (all copies are valid); otherwise ``period`` is the slot count and slots outside ``slots`` may hold
    garbage. ``grid`` = (channel offsets, row stride, column stride) when the value is an image on a regular
    grid; ``box`` = [(stride, count), ...] when the valid slots form a box (count a power of two). ``batch``: images
    per ciphertext (1: one image tiled over the slots; a slot-batched layout, one image per slot, sets it > 1).
    """

    slots: np.ndarray
    period: int
    replicated: bool = False
    grid: tuple[tuple[int, ...], int, int] | None = None
    box: list[tuple[int, int]] | None = None
    batch: int = 1  # images per ciphertext: 1 = one image tiled over the slots (slot-batched layouts set > 1)
    blocks: int = 1  # ciphertexts holding the value (> 1: ``slots`` address block * slot count + local slot)

    def to_dict(self) -> dict:
        return {"slots": [int(s) for s in self.slots], "period": int(self.period), "replicated": self.replicated}

    def same_slots(self, other: "Layout") -> bool:
        return (np.array_equal(self.slots, other.slots) and self.period == other.period
                and self.replicated == other.replicated and self.batch == other.batch)


def grid_layout(shape: tuple[int, ...], period: int, replicated: bool) -> Layout:
    """Compact row-major layout (c*H*W + i*W + j), the layout of a freshly packed tensor."""
    size = int(np.prod(shape))
    if len(shape) == 3:
        c, h, w = shape
        return Layout(np.arange(size), period, replicated, grid=(tuple(k * h * w for k in range(c)), w, 1))
    return Layout(np.arange(size), period, replicated)


def grid_slots(offsets: tuple[int, ...], rs: int, cs: int, h: int, w: int) -> np.ndarray:
    base = np.add.outer(np.arange(h) * rs, np.arange(w) * cs).ravel()
    return np.concatenate([off + base for off in offsets])


def _channel_offset_candidates(offs: tuple[int, ...], c: int, rs: int, cs: int,
                               stride: tuple[int, int]) -> list[tuple[int, ...]]:
    """Regular channel placements to try, best first: keep the input's offsets (extended with the same channel
    stride), then multiplex channels into the gaps a stride leaves (few distinct channel shifts = few diagonals)."""
    out = []
    if c <= len(offs):
        out.append(tuple(offs[:c]))
    step = offs[1] - offs[0] if len(offs) > 1 else None
    if step:
        out.append(tuple(offs[0] + k * step for k in range(c)))
    sub = [dy * rs + dx * cs for dy in range(stride[0]) for dx in range(stride[1])]
    if len(sub) > 1:
        per = len(sub)
        block = step or 0
        out.append(tuple(offs[0] + sub[k % per] + (k // per) * block for k in range(c)))
    return out


def strided_layout(inp: Layout, shape: tuple[int, int, int], stride: tuple[int, int],
                   slots_total: int | None = None) -> Layout | None:
    """Output grid of a conv/pool on ``inp``'s grid: same origin, steps multiplied by the stride (no repacking).

    Channels keep a regular stride when they fit (a replicated input lets more output channels spill into the
    next copies: the output period grows to a power of two, still replicated); otherwise they are packed greedily
    into free slots of the period (e.g. into the gaps a stride leaves). None when the grid cannot hold the output.
    """
    if inp.grid is None:
        return None
    limit = slots_total if (inp.replicated and slots_total) else inp.period
    offs, rs, cs = inp.grid
    c, h, w = shape
    rs2, cs2 = rs * stride[0], cs * stride[1]
    base = np.add.outer(np.arange(h) * rs2, np.arange(w) * cs2).ravel()
    extent = int(base.max()) + 1
    for cand in _channel_offset_candidates(offs, c, rs, cs, stride):
        slots = grid_slots(cand, rs2, cs2, h, w)
        if slots.min() >= 0 and slots.max() < limit and len(np.unique(slots)) == len(slots):
            period = max(inp.period, next_pow2(int(slots.max()) + 1)) if inp.replicated else inp.period
            return Layout(slots, period, inp.replicated, grid=(cand, rs2, cs2))
    used = np.zeros(inp.period, dtype=bool)
    chosen: list[int] = []
    start = 0
    for _ in range(c):
        off = start
        while off + extent <= inp.period and used[off + base].any():
            off += 1
        if off + extent > inp.period:
            return None
        used[off + base] = True
        chosen.append(off)
        start = off + 1
    slots = grid_slots(tuple(chosen), rs2, cs2, h, w)
    return Layout(slots, inp.period, inp.replicated, grid=(tuple(chosen), rs2, cs2))


# ---------------------------------------------------------------------------------------------------------------
# lowered linear maps


@dataclass
class Lowered:
    """``reduce(sum_d diags[d] * rot(x, d))`` with the resulting layout; diagonals are length-S vectors."""

    strategy: str
    diags: dict[int, np.ndarray]
    reduce: list[int]
    layout: Layout
    inputs_per_term: dict[int, int] = field(default_factory=dict)  # gather: diagonal key -> input ciphertext

    def bsgs(self, slots: int) -> tuple[int, list[int], list[int]]:
        return split_bsgs(list(self.diags), slots)

    def rotations(self, slots: int) -> int:
        if self.strategy.startswith("gather"):
            return len(self.reduce) + (self.strategy == "gather-complex")
        g, babies, giants = self.bsgs(slots)
        return len([b for b in babies if b]) + len([x for x in giants if x]) + len(self.reduce)

    def cost(self, slots: int) -> float:
        return self.rotations(slots) + 0.05 * len(self.diags)


def split_bsgs(offsets: list[int], slots: int) -> tuple[int, list[int], list[int]]:
    """Giant step G (a power of two) minimising baby + giant rotations; returns (G, babies, giants)."""
    best = None
    g = 1
    while g <= slots:
        babies = sorted({d % g for d in offsets})
        giants = sorted({d - d % g for d in offsets})
        cost = len([b for b in babies if b]) + len([x for x in giants if x])
        if best is None or cost < best[0]:
            best = (cost, g, babies, giants)
        g *= 2
    return best[1], best[2], best[3]


def _entries(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    coo = matrix.tocoo()
    keep = coo.data != 0
    return coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep]


def _group(diag_keys: np.ndarray, out_slots: np.ndarray, values: np.ndarray, slots: int) -> dict[int, np.ndarray]:
    diags: dict[int, np.ndarray] = {}
    order = np.argsort(diag_keys, kind="stable")
    keys, out_slots, values = diag_keys[order], out_slots[order], values[order]
    bounds = np.flatnonzero(np.diff(keys)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(keys)]):
        if lo == hi:
            continue
        vec = np.zeros(slots)
        where = out_slots[lo:hi]
        if len(np.unique(where)) != len(where):  # pragma: no cover - layouts are injective by construction
            raise AssertionError("two products landed in one slot of a diagonal")
        vec[where] = values[lo:hi]
        diags[int(keys[lo])] = vec
    return diags


def lower_direct(matrix: sp.csr_matrix, inp: Layout, out: Layout, slots: int) -> Lowered:
    """Diagonal method with a fixed output layout (output copies follow the input's replication)."""
    rows, cols, vals = _entries(matrix)
    so = out.slots[rows]
    si = inp.slots[cols]
    if inp.replicated:  # read the copy nearest to the output slot: small, repeated offsets
        si = si + inp.period * np.round((so - si) / inp.period).astype(np.int64)
    d = (si - so) % slots
    copies = slots // out.period if (out.replicated and inp.replicated) else 1
    if copies > 1:
        k = np.arange(copies) * out.period
        so = (so[:, None] + k[None, :]).ravel()
        d = np.repeat(d, copies)
        vals = np.repeat(vals, copies)
    layout = out if (copies > 1 or not out.replicated) else Layout(out.slots, slots, False, out.grid, out.box)
    return Lowered("direct", _group(d, so % slots, vals, slots), [], layout)


def lower_hybrid(matrix: sp.csr_matrix, inp: Layout, slots: int) -> Lowered | None:
    """Hybrid diagonal method for a dense map to a flat output; q rows per input copy, then rotate-and-sum."""
    m = matrix.shape[0]
    period = inp.period if inp.replicated else slots
    copies = slots // period
    q = max(1, next_pow2(m) // copies)
    if q > period or -(-m // q) > copies:
        return None
    rows, cols, vals = _entries(matrix)
    b, r = rows // q, rows % q
    si = inp.slots[cols]
    delta = (si - r) % q
    s = b * period + (si - delta) % period
    diags = _group(delta, s, vals, slots)
    reduce = []
    step = q
    while step < period:
        reduce.append(step)
        step *= 2
    out_slots = (np.arange(m) // q) * period + np.arange(m) % q
    box = [(1, q), (period, next_pow2(-(-m // q)))] if q < period else None
    return Lowered("hybrid", diags, reduce, Layout(out_slots, slots, False, box=box))


def lower_hybrid_replicated(matrix: sp.csr_matrix, inp: Layout, slots: int) -> Lowered | None:
    """Hybrid method over all slots: output row j in every slot s = j (mod m2), i.e. replicated with period m2.

    Costs log2(copies) more reduction steps than :func:`lower_hybrid` but leaves the result everywhere, which
    makes a following channel broadcast (squeeze-excite) nearly free.
    """
    m = matrix.shape[0]
    m2 = next_pow2(m)
    period = inp.period if inp.replicated else slots
    if m2 > period:
        return None
    copies = slots // period
    rows, cols, vals = _entries(matrix)
    si = inp.slots[cols]
    delta = (si - rows) % m2
    base = si - delta  # = rows (mod m2), in [si - m2 + 1, si]
    # Products sit in every copy, so the partial sums are periodic and one period's window holds a full row sum.
    s = (base[:, None] + np.arange(copies)[None, :] * period).ravel() % slots
    diags = _group(np.repeat(delta, copies), s, np.repeat(vals, copies), slots)
    reduce = []
    step = m2
    while step < period:
        reduce.append(step)
        step *= 2
    return Lowered("hybrid-replicated", diags, reduce, Layout(np.arange(m), m2, True))


def lower_box(matrix: sp.csr_matrix, inp: Layout, slots: int) -> Lowered | None:
    """Dense map on a box-shaped sparse input: output j gathers its products at a shifted copy of the box."""
    if inp.box is None or inp.replicated or inp.box[0][0] != 1:
        return None
    m = matrix.shape[0]
    q = inp.box[0][1]
    gap = inp.box[1][0] if len(inp.box) > 1 else slots
    if m * q > gap:
        return None
    rows, cols, vals = _entries(matrix)
    si = inp.slots[cols]
    diags = _group((-rows * q) % slots, (si + rows * q) % slots, vals, slots)
    reduce = []
    for stride, count in inp.box:
        step = stride
        while step < stride * count:
            reduce.append(step)
            step *= 2
    out_slots = (inp.slots.min() + np.arange(m) * q) % slots
    return Lowered("box", diags, reduce, Layout(out_slots, slots, False))


def lower_gather(matrix: sp.csr_matrix, pattern: sp.csr_matrix, out_shape: tuple[int, ...],
                 slots: int, complex_pairs: bool = False) -> tuple[Lowered, np.ndarray]:
    """First layer, im2col by the client: returns the lowering and the public gather map.

    ``gather_map[k, s]`` is the input element the client puts in slot s of ciphertext k (-1: zero). Several taps
    share one ciphertext in different blocks; ``reduce`` then folds the blocks, leaving the output replicated in
    every block. With ``complex_pairs`` each slot carries two taps, one in the real and one in the imaginary
    part (rows 2k and 2k+1 of the map describe ciphertext k): weights a - i*b make Re(w*z) = a*x_re + b*x_im,
    so half the ciphertexts go over the wire and one conjugation (``strategy == "gather-complex"``) drops the
    imaginary garbage. Weights carry the 1/2 of Re(y) = (y + conj(y)) / 2.
    """
    m = matrix.shape[0]
    block = next_pow2(m)
    blocks = slots // block
    pattern = sp.csr_matrix(pattern)
    counts = np.diff(pattern.indptr)
    taps = int(counts.max()) if m else 0
    # Fewest ciphertexts: each one costs the client an encryption and the wire ~N*log(Q)/4 bytes, while sharing
    # blocks costs the server only log2(share) rotations.
    share = min(blocks, next_pow2(max(1, taps)))
    complex_pairs = complex_pairs and taps > share  # one ciphertext suffices anyway: no conjugation needed
    per_ct = share * (2 if complex_pairs else 1)
    n_ct = max(1, -(-taps // per_ct))
    out = grid_layout(out_shape, block, True)
    rows_per_ct = 2 if complex_pairs else 1
    gather = np.full((n_ct * rows_per_ct, slots), -1, dtype=np.int64)
    weights = np.zeros((n_ct, slots), dtype=np.complex128 if complex_pairs else np.float64)
    pattern.sort_indices()
    rows = np.repeat(np.arange(m), counts)
    cols = pattern.indices.astype(np.int64)
    taps_of = np.arange(len(cols)) - pattern.indptr[rows]  # rank of each tap within its output row
    vals = np.asarray(sp.csr_matrix(matrix)[rows, cols]).ravel()
    ct, rest = np.divmod(taps_of, per_ct)
    part, group = np.divmod(rest, share)  # part 0: real, 1: imaginary
    base = out.slots[rows]
    coef = vals if not complex_pairs else np.where(part == 0, vals, -1j * vals) / 2
    for j in range(blocks // share):
        where = (group + j * share) * block + base
        gather[ct * rows_per_ct + part, where] = cols
        np.add.at(weights, (ct, where), coef)  # real and imaginary taps of one slot share its weight a - i*b
    reduce = []
    step = block
    while step < block * share:
        reduce.append(step)
        step *= 2
    diags = {k: weights[k] for k in range(n_ct)}
    strategy = "gather-complex" if complex_pairs else "gather"
    return Lowered(strategy, diags, reduce, out, {k: k for k in range(n_ct)}), gather
