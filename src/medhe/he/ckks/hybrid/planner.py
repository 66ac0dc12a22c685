"""Choosing a hybrid chain (digits and special primes) for a compiled plan, from predicted time and keys' size.

The data primes stay exactly those the plan was lowered for (scales are exact ratios of them); only SEAL's single
special prime is replaced by k special primes of one bit size that no data prime has (so SEAL's prime choice
for the data sizes cannot move), with P covering the widest digit, as wide as the 128-bit room allows (up to 60
bits each: the switch noise falls with P). Candidates: every ``alpha`` (data primes per
digit) whose chain stays within the 128-bit limit. Each is priced by

* keys as sent: per key, the digits its level reads (``ceil((level+1)/alpha)``; the others are not sent) times
  one seeded polynomial over every prime;
* key-switch work: for every key at its level, the NTTs of ModUp and ModDown plus the key product, in units of
  one n-point NTT (an elementwise product of n words ~ 0.15 of one);

and the fastest candidate whose keys fit ``max_key_bytes`` wins (the smallest keys when none fits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from medhe.errors import PlanError
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.security import MAX_MODULUS_BITS_128

MUL = 0.15  # elementwise product of n words, in n-point NTTs
FRAME_OVERHEAD = 200  # compact frame, skeleton and seed per digit


@dataclass(frozen=True)
class Choice:
    params: CKKSParams
    key_bytes: int
    cost: float  # key-switch work of the plan, n-point NTTs
    seal_cost: float  # the same with SEAL's keys

    def describe(self) -> str:
        p = self.params
        return (f"key switching: hybrid, {p.specials} special primes of {p.prime_bits[-1]} bits, "
                f"{math.ceil(len(p.data_bits) / p.alpha)} digits of {p.alpha} primes, predicted switch work "
                f"{self.cost / self.seal_cost:.2f}x SEAL's keys")


def digits_at(level: int, alpha: int) -> int:
    return math.ceil((int(level) + 1) / alpha)


def key_bytes(params: CKKSParams, level: int) -> int:
    """One hybrid key on the wire, used up to ``level``: the digits that level reads, each one bit-packed
    polynomial over every prime of Q*P (its uniform half is a seed)."""
    return digits_at(level, params.alpha) * (params.poly_degree * sum(params.prime_bits) // 8 + FRAME_OVERHEAD)


def switch_cost(level: int, alpha: int, k: int) -> float:
    """n-point NTTs (and products) of one hybrid key switch at ``level`` (alpha 0: SEAL's format, k = 1)."""
    limbs = level + 1
    if alpha == 0:
        return limbs + limbs * limbs + 2 * MUL * limbs * (limbs + 1) + 2 + 2 * limbs
    d = digits_at(level, alpha)
    up = limbs + d * (limbs + k - min(alpha, limbs)) + MUL * d * min(alpha, limbs) * (limbs + k)
    product = 2 * MUL * d * (limbs + k)
    down = 2 * k + 2 * limbs + 2 * MUL * k * limbs
    return up + product + down


def _levels(key_levels: dict[str, Any]) -> list[int]:
    out = [int(v) for v in key_levels["galois"].values()]
    if int(key_levels["relin"]) >= 0:
        out.append(int(key_levels["relin"]))
    return out


def candidates(params: CKKSParams, key_levels: dict[str, Any]) -> list[Choice]:
    n, data = params.poly_degree, list(params.data_bits)
    levels = _levels(key_levels)
    seal_cost = sum(switch_cost(lv, 0, 1) for lv in levels)
    room = MAX_MODULUS_BITS_128[n] - sum(data)
    out = []
    for alpha in range(1, len(data) + 1):
        widest = max(sum(data[j:j + alpha]) for j in range(0, len(data), alpha))
        for k in range(1, 13):
            # k primes of `bits` bits: P >= 2^(k(bits-1)) > Q_j; wider when the 128-bit room allows (less noise)
            bits = max(math.ceil((widest + k) / k), min(60, room // k))
            while bits in data and bits > math.ceil((widest + k) / k):
                bits -= 1
            while bits in data and bits <= 60:
                bits += 1
            if bits > 60 or bits < 20:
                continue
            if k * bits > room:
                break
            cand = replace(params, prime_bits=tuple(data) + (bits,) * k, specials=k, alpha=alpha)
            try:
                cand.validate()
            except PlanError:
                continue
            sent = sum(key_bytes(cand, lv) for lv in levels)
            cost = sum(switch_cost(lv, alpha, k) for lv in levels)
            out.append(Choice(cand, sent, cost, seal_cost))
            break
    return out


def choose(params: CKKSParams, key_levels: dict[str, Any], max_key_bytes: int) -> Choice:
    """The fastest hybrid chain for the plan whose keys fit ``max_key_bytes`` (else the one with the smallest)."""
    options = candidates(params, key_levels)
    if not options:
        raise PlanError(f"no hybrid key layout fits N={params.poly_degree} at 128 bits with these data primes: "
                        "use SEAL's key format (key_switching='seal')")
    fitting = [c for c in options if c.key_bytes <= max_key_bytes]
    if fitting:
        return min(fitting, key=lambda c: (c.cost, c.key_bytes))
    return min(options, key=lambda c: (c.key_bytes, c.cost))
