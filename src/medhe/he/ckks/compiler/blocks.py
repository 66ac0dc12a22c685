"""Values that span several ciphertexts ("blocks"): layouts over a global slot space and linear maps across blocks.

A multi-block value's ``Layout.slots`` address the global slot space ``block * slots + local slot``; the value is held
by ``Layout.blocks`` registers, one per ciphertext. Element-wise operations run block by block. A linear map is split
into (output block, input block) sub-matrices, each lowered to diagonals like a one-ciphertext map: output block
``bo`` = ``sum_{bi, d} diag[bo, bi, d] * rot(x[bi], d)`` (local rotations: an entry reading the next or previous
block needs the same rotation as one inside the block, so block boundaries cost plaintexts, not rotations). With one
giant step ``G`` for the whole layer, the baby rotations ``rot(x[bi], d mod G)`` are computed once per input block and
shared by every output block (the interpreter keeps them), and the giant rotations once per output block.

Flat outputs (squeeze-excite means, the classifier head) use the hybrid method across blocks: every input block's
products are gathered into the residue class of their row (q = next_pow2(rows) diagonals per block, shared giants),
summed into one ciphertext, and a rotate-and-sum over the whole slot vector leaves every row's total in every slot
of its class (the output is replicated and holds nothing but sums: see ``lower._Lowering.lower_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from medhe.he.ckks.compiler.packing import Layout, _entries, grid_slots, next_pow2


def packed_layout(shape: tuple[int, ...], slots: int) -> Layout:
    """A fresh input too large for one ciphertext: row-major over ceil(size / slots) blocks."""
    size = int(np.prod(shape))
    k = -(-size // slots)
    grid = None
    if len(shape) == 3:
        c, h, w = shape
        grid = (tuple(ch * h * w for ch in range(c)), w, 1)
    return Layout(np.arange(size), k * slots, False, grid=grid, blocks=k)


def input_gather(layout: Layout, slots: int) -> np.ndarray:
    """Gather map of a packed multi-block input: row k is ciphertext k (element per slot, -1: zero)."""
    k = max(1, int(layout.blocks))
    gather = np.full(k * slots, -1, dtype=np.int64)
    gather[layout.slots] = np.arange(len(layout.slots))
    return gather.reshape(k, slots)


def image_layouts(inp: Layout, shape: tuple[int, int, int], stride: tuple[int, int] | None,
                  slots: int) -> list[tuple[str, Layout]]:
    """Candidate output layouts of an image->image map on ``inp``'s grid, named for the report.

    ``same``: the input's channel offsets (pooling, BN, a conv keeping its width); ``multiplex``: channels fill
    the gaps a stride leaves at every input channel offset (as ``packing.strided_layout`` does in one ciphertext);
    ``block``: each channel starts on a block boundary (its conv rotations are the spatial offsets only, shared by
    every channel pair); ``dense``: channels back to back (fewest blocks).
    """
    c, h, w = shape
    if inp.grid is None:
        offs, rs, cs = (0,), w, 1
        stride = (1, 1)
    else:
        offs, rs, cs = inp.grid
    stride = stride or (1, 1)
    rs2, cs2 = rs * stride[0], cs * stride[1]
    extent = (h - 1) * rs2 + (w - 1) * cs2 + 1
    origin = offs[0]
    out: list[tuple[str, tuple[int, ...]]] = []
    if c <= len(offs):
        out.append(("same", tuple(offs[:c])))
    # the gaps of the output grid: column gaps (cs2 > 1) and gap rows (rs2 a multiple of cs2 * w)
    rows_gap = rs2 // (cs2 * w) if rs2 % (cs2 * w) == 0 else 1
    sub = [dy * (rs2 // rows_gap) + dx for dy in range(rows_gap) for dx in range(cs2)]
    if len(sub) > 1:
        per = len(sub)
        step = offs[1] - offs[0] if len(offs) > 1 else -(-extent // slots) * slots
        places = [o + s for o in offs for s in sub]
        places += [offs[-1] + step * (k + 1) + s for k in range(-(-c // per)) for s in sub]
        out.append(("multiplex", tuple(places[:c])))
        # the gaps are taken (the input multiplexed already): fresh groups of ``per`` channels, block-aligned
        group = -(-(extent + max(sub)) // slots) * slots
        first = offs[0] - offs[0] % slots
        out.append(("multiplex-new", tuple(first + (k // per) * group + sub[k % per] for k in range(c))))
    per_channel = -(-extent // slots) * slots
    first = origin - origin % slots
    out.append(("block", tuple(first + k * per_channel for k in range(c))))
    if extent < slots:
        out.append(("dense", tuple(origin + k * extent for k in range(c))))
    result = []
    seen = set()
    for name, cand in out:
        slots_g = grid_slots(cand, rs2, cs2, h, w)
        if slots_g.min() < 0 or len(np.unique(slots_g)) != len(slots_g) or cand in seen:
            continue
        seen.add(cand)
        k = int(slots_g.max()) // slots + 1
        result.append((name, Layout(slots_g, k * slots, False, grid=(cand, rs2, cs2), blocks=k)))
    return result


@dataclass
class BlockLowered:
    """A linear map across blocks: per output block, {(input block, rotation d): length-``slots`` diagonal}."""

    strategy: str
    layout: Layout
    terms: list[dict[tuple[int, int], np.ndarray]]
    reduce: list[int] = field(default_factory=list)
    giant: int = 1


def choose_giant(bi: np.ndarray, bo: np.ndarray, d: np.ndarray, slots: int) -> tuple[int, int]:
    """The layer's giant step minimising baby rotations (per input block) + giant rotations (per output block)."""
    n_out = int(bo.max()) + 1 if len(bo) else 1
    key = np.unique((bi.astype(np.int64) * n_out + bo) * slots + d)
    pair, dd = np.divmod(key, slots)
    b_in, b_out = np.divmod(pair, n_out)
    best = None
    g = 1
    while g <= slots:
        baby = dd % g
        giant = dd - baby
        nb = len(np.unique((b_in * slots + baby)[baby != 0]))
        ng = len(np.unique((b_out * slots + giant)[giant != 0]))
        if best is None or nb + ng < best[0]:
            best = (nb + ng, g)
        g *= 2
    return best[1], best[0]


def _split(inp: Layout, out_local_block: np.ndarray, si: np.ndarray, so_local: np.ndarray, vals: np.ndarray,
           n_out: int, slots: int) -> list[dict[tuple[int, int], np.ndarray]]:
    bi, li = np.divmod(si, slots)
    d = (li - so_local) % slots
    k_in = max(1, int(inp.blocks))
    key = (out_local_block * k_in + bi) * slots + d
    order = np.argsort(key, kind="stable")
    key, so_local, vals = key[order], so_local[order], vals[order]
    bounds = np.flatnonzero(np.diff(key)) + 1
    terms: list[dict[tuple[int, int], np.ndarray]] = [dict() for _ in range(n_out)]
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(key)]):
        if lo == hi:
            continue
        k = int(key[lo])
        bo, rest = divmod(k, k_in * slots)
        b_in, dd = divmod(rest, slots)
        vec = np.zeros(slots)
        np.add.at(vec, so_local[lo:hi], vals[lo:hi])
        terms[bo][(b_in, dd)] = vec
    return terms


def _read_slots(inp: Layout, so_global: np.ndarray, cols: np.ndarray, slots: int) -> np.ndarray:
    si = inp.slots[cols]
    if inp.replicated:  # one ciphertext whose copies repeat: read the copy nearest to the output slot
        lo = so_global % slots
        si = (si + inp.period * np.round((lo - si) / inp.period).astype(np.int64)) % slots
    return si


def _per_output_block(matrix: sp.csr_matrix, inp: Layout, out: Layout, slots: int):
    """(output block, its entries as (input block, local out slot, rotation d, value)), one block at a time: a wide
    layer has tens of millions of entries, and a block's share keeps the compiler's memory small."""
    matrix = sp.csr_matrix(matrix)
    row_block = out.slots[: matrix.shape[0]] // slots
    order = np.argsort(row_block, kind="stable")
    bounds = np.searchsorted(row_block[order], np.arange(int(row_block.max()) + 2))
    for bo in range(len(bounds) - 1):
        rows_b = order[bounds[bo]:bounds[bo + 1]]
        if not len(rows_b):
            continue
        coo = matrix[rows_b].tocoo()
        keep = coo.data != 0
        rows, cols, vals = rows_b[coo.row[keep]], coo.col[keep].astype(np.int64), coo.data[keep]
        so = out.slots[rows]
        si = _read_slots(inp, so, cols, slots)
        lo = so % slots
        bi, li = np.divmod(si, slots)
        yield bo, bi, lo, (li - lo) % slots, vals


def _giant_and_pairs(matrix: sp.csr_matrix, inp: Layout, out: Layout, slots: int) -> tuple[int, int, int]:
    keys = []
    for bo, bi, _, d, _ in _per_output_block(matrix, inp, out, slots):
        keys.append(np.unique(bi * slots + d) + bo * slots * max(1, int(inp.blocks)))
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    pair, d = np.divmod(key, slots)
    bo, bi = np.divmod(pair, max(1, int(inp.blocks)))
    g, rot = choose_giant(bi, bo, d, slots)
    return g, rot, len(key)


def pair_stats(matrix: sp.csr_matrix, inp: Layout, out: Layout, slots: int) -> tuple[int, int]:
    """(rotations, products) of :func:`lower_blocks` without building the diagonals (for choosing layouts)."""
    _, rot, products = _giant_and_pairs(matrix, inp, out, slots)
    return rot, products


def lower_blocks(matrix: sp.csr_matrix, inp: Layout, out: Layout, slots: int) -> BlockLowered:
    """Diagonal method across blocks with a fixed output layout (the input may be one replicated ciphertext)."""
    g, _, _ = _giant_and_pairs(matrix, inp, out, slots)
    terms: list[dict[tuple[int, int], np.ndarray]] = [dict() for _ in range(max(1, int(out.blocks)))]
    for bo, bi, lo, d, vals in _per_output_block(matrix, inp, out, slots):
        key = bi * slots + d
        order = np.argsort(key, kind="stable")
        key, lo_s, vals = key[order], lo[order], vals[order]
        cuts = np.flatnonzero(np.diff(key)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(key)]):
            vec = np.zeros(slots)
            np.add.at(vec, lo_s[a:b], vals[a:b])
            terms[bo][divmod(int(key[a]), slots)] = vec
    return BlockLowered("blocks", out, terms, [], g)


def lower_block_hybrid(matrix: sp.csr_matrix, inp: Layout, slots: int) -> BlockLowered:
    """A flat output (<= slots rows) from a multi-block input, replicated with period next_pow2(rows)."""
    m = matrix.shape[0]
    q = next_pow2(m)
    rows, cols, vals = _entries(matrix)
    si = inp.slots[cols]
    li = si % slots
    delta = (li - rows) % q
    s = (li - delta) % slots  # = row (mod q)
    bo = np.zeros(len(rows), dtype=np.int64)
    terms = _split(inp, bo, si, s, vals, 1, slots)
    reduce = []
    step = q
    while step < slots:
        reduce.append(step)
        step *= 2
    bi = si // slots
    g, _ = choose_giant(bi, bo, delta, slots)
    return BlockLowered("block-hybrid", Layout(np.arange(m), q, True), terms, reduce, g)
