"""Evaluation-key and input budgets: bytes as sent, which rotation keys to keep, and the level each key is used at.

Key levels are computed once, when the plan is compiled (``key_levels_of``), by running the program's own
interpreter on zero slot vectors, and stored in ``Plan.key_levels``: the client sends each key trimmed to them and
the server refuses keys trimmed below them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medhe.he.ckks.compiler.params import data_primes
from medhe.he.ckks.compiler.program import Plan, naf
from medhe.he.ckks.runtime import run_program
from medhe.he.ckks.simulate import SimText, SlotSimulator

class _KeyLevelRecorder(SlotSimulator):
    """The simulator, noting the level of every key switch (rotation, conjugation, relinearization)."""

    def __init__(self, slots: int, top: int, primes: list[int]) -> None:
        super().__init__(slots, top, primes)
        self.galois: dict[int, int] = {}
        self.relin = -1

    def _note(self, step: int, level: int) -> None:
        self.galois[step] = max(self.galois.get(step, -1), level)

    def rotate(self, a: SimText, step: int) -> SimText:
        signed = ((int(step) + self.slots // 2) % self.slots) - self.slots // 2
        self._note(signed, a.level)
        return super().rotate(a, step)

    def conjugate(self, a: SimText) -> SimText:
        self._note(0, a.level)
        return super().conjugate(a)

    def relinearize(self, a: SimText) -> SimText:
        self.relin = max(self.relin, a.level)
        return super().relinearize(a)


def key_levels_of(plan: Plan) -> dict[str, Any]:
    """Highest level each of the plan's evaluation keys is used at (the client sends the keys trimmed to it, see
    ``wire.serialize``): {"galois": {key step: level}, "relin": level, or -1 without relinearization}.

    Found by running the plan's own instruction stream (the interpreter the server runs) on zero slot vectors,
    so it cannot disagree with evaluation about where each key switch happens.
    """
    rec = _KeyLevelRecorder(plan.params.slots, plan.input_level, data_primes(plan.params))
    zeros = np.zeros(plan.params.slots)
    inputs = [SimText(zeros.copy(), plan.input_level, plan.input_scale) for _ in range(plan.input_ciphertexts)]
    plains = [SimText(zeros if not np.isscalar(p.values) else np.zeros(1), p.level, p.scale, 1) for p in plan.plains]
    run_program(plan, rec, plains, inputs)
    return {"galois": {str(s): int(rec.galois.get(s, plan.input_level)) for s in plan.rotation_steps},
            "relin": int(rec.relin) if plan.needs_relin else -1}


INPUT_BUDGET_BYTES = 8_000_000  # encrypted input as sent, per image
KEY_BUDGET_BYTES = 46_000_000  # evaluation keys as sent; beyond it rotations are composed from power-of-two keys


def key_bytes_as_sent(params: Any, level: int | None = None) -> int:
    """One seeded Galois/relinearization key on the wire, trimmed to ``level`` (None: whole): level + 1
    components, each a single bit-packed polynomial over primes 0..level and the special prime (the other half is
    a 64-byte seed)."""
    if getattr(params, "hybrid", False):  # hybrid keys: whole digits over every prime (medhe.he.ckks.hybrid)
        from medhe.he.ckks.hybrid.planner import key_bytes

        return key_bytes(params, len(params.data_bits) - 1 if level is None else int(level))
    n, bits = params.poly_degree, list(params.prime_bits)
    top = len(bits) - 2
    lv = top if level is None else min(max(int(level), 0), top)
    return n * (lv + 1) * (sum(bits[: lv + 1]) + bits[-1]) // 8


def ciphertext_bytes_as_sent(params: Any) -> int:
    """One fresh seeded input ciphertext on the wire: a single bit-packed polynomial over the data primes."""
    return params.poly_degree * sum(params.prime_bits[:-getattr(params, "specials", 1)]) // 8


def choose_key_paths(usage: dict[int, float], slots: int, key_bytes: dict[int, int] | int,
                     max_key_bytes: int) -> dict[int, list[int]]:
    """Fewer Galois keys when one per step would exceed ``max_key_bytes``.

    Greedily drops the least-used step that is the sum of two kept steps (it then costs two rotations), and
    falls back to power-of-two keys (NAF paths) if that is not enough. ``usage``: step -> rotations weighted by
    their cost (primes at their level); ``key_bytes``: step -> bytes of its key (or one size for all).
    Returns {} when every step keeps its own key.
    """
    size = (lambda s: key_bytes) if isinstance(key_bytes, int) else (lambda s: key_bytes[s])

    def norm(step: int) -> int:
        return ((step + slots // 2) % slots) - slots // 2

    keys = set(usage)
    if sum(map(size, keys)) <= max_key_bytes:
        return {}
    split: dict[int, tuple[int, int]] = {}
    while sum(map(size, keys)) > max_key_bytes:
        best = None
        for step in keys:
            for a in keys:
                b = norm(step - a)
                if a != step and b != step and b in keys and (best is None or usage[step] < best[0]):
                    best = (usage[step], step, a, b)
        if best is None:
            return {s: naf(s) for s in usage}
        _, step, a, b = best
        keys.discard(step)
        split[step] = (a, b)

    def path(step: int) -> list[int]:
        if step in keys:
            return [step]
        a, b = split[step]
        return path(a) + path(b)

    return {s: path(s) for s in usage}
