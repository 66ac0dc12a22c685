"""A plaintext slot simulator implementing the ``Backend`` interface: the compiled program on bare vectors.

It runs exactly the instruction stream the SEAL backend runs (rotations, plaintext products, level and scale
bookkeeping) but on unencrypted float64 slot vectors, without noise. That separates the two questions one asks
of a new layout or lowering: "is the slot arithmetic right?" (this, exact to ~1e-12, milliseconds) and "is the
precision enough?" (SEAL). It also shows what a second backend has to implement. It is not encryption: never
use it to serve anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medhe.errors import PlanError
from medhe.he.ckks.backends.base import Backend
from medhe.he.ckks.compiler.params import data_primes
from medhe.he.ckks.runtime import run_program


@dataclass
class SimText:
    """A simulated plaintext or ciphertext: slot values, level, scale (and polynomial count for products)."""

    values: np.ndarray
    level: int
    scale: float
    size: int = 2


class SlotSimulator(Backend):
    """Runs a program on plaintext slot vectors, checking levels and scales as SEAL would (needs no keys)."""

    name = "simulator"

    def __init__(self, slots: int, top: int, primes: list[int]) -> None:
        self.slots, self.top, self.primes = slots, top, primes

    def _check(self, a: SimText, b: SimText) -> None:
        if a.level != b.level:
            raise PlanError(f"simulated program mixes levels {a.level} and {b.level}")

    def fresh(self) -> "SlotSimulator":
        return SlotSimulator(self.slots, self.top, self.primes)

    def load_evaluation_keys(self, galois: bytes, relin: bytes, levels=None) -> None:
        raise PlanError("the slot simulator computes on plaintext slots and takes no keys")

    def has_rotation(self, step: int) -> bool:
        return True

    def encode(self, values, level: int, scale: float) -> SimText:
        if np.isscalar(values):
            vec = np.full(self.slots, float(values))
        else:
            vec = np.asarray(values, dtype=np.complex128 if np.iscomplexobj(values) else np.float64)
        return SimText(vec.copy(), level, float(scale), 1)

    def encrypt(self, plain: SimText) -> SimText:
        return SimText(plain.values.copy(), plain.level, plain.scale)

    def decrypt(self, ct: SimText) -> np.ndarray:
        return ct.values.copy()

    def add(self, a: SimText, b: SimText) -> SimText:
        self._check(a, b)
        if not np.isclose(a.scale, b.scale, rtol=1e-9):
            raise PlanError(f"simulated add of scales {a.scale} and {b.scale}")
        return SimText(a.values + b.values, a.level, a.scale, max(a.size, b.size))

    def add_inplace(self, a: SimText, b: SimText) -> None:
        out = self.add(a, b)
        a.values, a.size = out.values, out.size

    def add_plain(self, a: SimText, p: SimText) -> SimText:
        return self.add(a, SimText(p.values, p.level, p.scale, 1))

    def negate(self, a: SimText) -> SimText:
        return SimText(-a.values, a.level, a.scale, a.size)

    def multiply_plain(self, a: SimText, p: SimText) -> SimText:
        self._check(a, p)
        return SimText(a.values * p.values, a.level, a.scale * p.scale, a.size)

    def multiply(self, a: SimText, b: SimText) -> SimText:
        self._check(a, b)
        return SimText(a.values * b.values, a.level, a.scale * b.scale, 3)

    def relinearize(self, a: SimText) -> SimText:
        return SimText(a.values, a.level, a.scale, 2)

    def rescale(self, a: SimText) -> SimText:
        if a.level < 1:
            raise PlanError("simulated program rescales below the last level")
        return SimText(a.values, a.level - 1, a.scale / self.primes[a.level], a.size)

    def rotate(self, a: SimText, step: int) -> SimText:
        if a.size != 2:
            raise PlanError("simulated program rotates an unrelinearized ciphertext")
        return SimText(np.roll(a.values, -int(step)), a.level, a.scale, a.size)

    def conjugate(self, a: SimText) -> SimText:
        return SimText(np.conj(a.values), a.level, a.scale, a.size)

    def mod_switch(self, a: SimText, level: int) -> SimText:
        if level > a.level:
            raise PlanError("simulated program mod-switches upwards")
        return SimText(a.values, level, a.scale, a.size)

    def level(self, ct: SimText) -> int:
        return ct.level

    def scale(self, ct: SimText) -> float:
        return ct.scale

    def serialize(self, ct: SimText) -> bytes:
        return ct.values.tobytes()

    def load_ciphertext(self, data: bytes) -> SimText:
        return SimText(np.frombuffer(data, dtype=np.float64).copy(), 0, 1.0)


def simulate(plan, x: np.ndarray) -> np.ndarray:
    """The plan's output for input ``x``, computed on plaintext slots (exact up to float rounding)."""
    sim = SlotSimulator(plan.params.slots, plan.input_level, data_primes(plan.params))
    flat = np.append(np.asarray(x, dtype=np.float64).reshape(-1), 0.0)
    rows = flat[plan.gather]
    if plan.input_complex:
        rows = rows[0::2] + 1j * rows[1::2]
    inputs = [sim.encrypt(sim.encode(row, plan.input_level, plan.input_scale)) for row in rows]
    plains = [sim.encode(p.values, p.level, p.scale) for p in plan.plains]
    out = run_program(plan, sim, plains, inputs)
    return np.real(out.values[plan.registers[plan.output_register].layout.slots[: plan.output_count]])
