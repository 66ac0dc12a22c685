"""The shape of a hybrid key-switching chain: data primes, special primes, digits, and the checks it must pass.

A layout is public (it is part of the model spec): the server needs it to read keys and to run ModUp/ModDown,
the client to make keys. The checks: every prime distinct and NTT-friendly for the ring, the special primes'
product P at least every digit's modulus (else the digit noise divided by P is not small), and log2(Q P) --
special primes included -- within the HomomorphicEncryption.org 128-bit limit for the ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medhe.errors import PlanError
from medhe.he.security import check_rlwe_128


@dataclass(frozen=True)
class HybridLayout:
    """Data primes (level 0 first), special primes, and ``alpha`` data primes per digit."""

    poly_degree: int
    data_primes: tuple[int, ...]
    special_primes: tuple[int, ...]
    alpha: int

    @property
    def levels(self) -> int:
        return len(self.data_primes)

    @property
    def dnum(self) -> int:
        """Number of digits (over the whole chain; a lower level uses the digits its primes fall into)."""
        return math.ceil(self.levels / self.alpha)

    @property
    def primes(self) -> tuple[int, ...]:
        """Every prime of the key level: data primes, then special primes (the order of the key's limbs)."""
        return self.data_primes + self.special_primes

    def digit(self, j: int) -> tuple[int, ...]:
        """Indices of the data primes in digit ``j``."""
        return tuple(range(j * self.alpha, min((j + 1) * self.alpha, self.levels)))

    def digit_bits(self, j: int) -> float:
        return sum(math.log2(self.data_primes[i]) for i in self.digit(j))

    @property
    def special_bits(self) -> float:
        return sum(math.log2(p) for p in self.special_primes)

    @property
    def modulus_bits(self) -> list[int]:
        """Bit sizes of every prime, special primes included: what the 128-bit table is checked against."""
        return [p.bit_length() for p in self.primes]

    def switch_noise(self, sigma: float = 3.2) -> float:
        """Predicted standard deviation of one coefficient of a key switch's added noise (top level).

        Digit j adds x_j e_j / P with x_j uniform in (-Q_j/2, Q_j/2] and e_j SEAL's error: N Q_j^2 sigma^2 / (12 P^2);
        ModDown's rounding adds r0 + r1 s (r uniform in [-1/2, 1/2], s ternary): about N (2/3) / 12. A slot then sees
        about sqrt(N) times this, divided by the scale: the precision side of the keys-size trade.
        """
        n = self.poly_degree
        digits = sum(n * 2.0 ** (2 * (self.digit_bits(j) - self.special_bits)) * sigma ** 2 / 12
                     for j in range(self.dnum))
        return math.sqrt(digits + n * (2 / 3) / 12 + 1 / 12)

    def key_words(self) -> int:
        """64-bit words of one key in memory (both polynomials of every digit over every prime)."""
        return self.dnum * 2 * len(self.primes) * self.poly_degree

    def check(self) -> "HybridLayout":
        """Raise ``PlanError`` / ``SecurityError`` unless the layout is usable and >= 128-bit; returns self."""
        n = int(self.poly_degree)
        if not self.data_primes or not self.special_primes:
            raise PlanError("a hybrid chain needs at least one data prime and one special prime")
        if not 1 <= int(self.alpha) <= self.levels:
            raise PlanError(f"a digit holds 1 to {self.levels} data primes, not {self.alpha}")
        if len(set(self.primes)) != len(self.primes):
            raise PlanError("the chain's primes must be distinct")
        if any(p % (2 * n) != 1 or p.bit_length() > 60 for p in self.primes):
            raise PlanError(f"every prime must be 1 mod 2N={2 * n} and at most 60 bits")
        widest = max(self.digit_bits(j) for j in range(self.dnum))
        if self.special_bits < widest:
            raise PlanError(f"the special primes ({self.special_bits:.1f} bits) must cover each digit "
                            f"(widest {widest:.1f} bits): add special primes or use smaller digits")
        check_rlwe_128(n, self.modulus_bits)
        return self

    def to_dict(self) -> dict:
        return {"special_primes": list(self.special_primes), "alpha": int(self.alpha), "dnum": self.dnum}
