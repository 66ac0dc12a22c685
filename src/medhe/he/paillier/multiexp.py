"""Simultaneous multi-exponentiation prod_i b_i**e_i mod m (Straus / Shamir's trick) on gmpy2 integers.

The server's whole job is Enc(w . x) = prod_i Enc(x_i)**w_i. Raising each ciphertext separately costs one squaring
chain per feature; interleaving them shares a single chain of max-bit-length squarings across all features, so
the cost is about (bits + total set bits) modular multiplications instead of d * 1.5 * bits. This is plain
arithmetic on public ciphertexts, not a cryptographic primitive.
"""

from __future__ import annotations

from typing import Sequence

import gmpy2


def bit_schedule(exponents: Sequence[int]) -> list[list[int]]:
    """For each bit position, most significant first, the indices whose exponent has that bit set.

    Exponents are the server's fixed weights, so this is computed once at compile time.
    """
    exps = [int(e) for e in exponents]
    if any(e < 0 for e in exps):
        raise ValueError("multi-exponentiation needs non-negative exponents")
    nbits = max((e.bit_length() for e in exps), default=0)
    return [[i for i, e in enumerate(exps) if (e >> k) & 1] for k in range(nbits - 1, -1, -1)]


def multi_pow(bases: Sequence[gmpy2.mpz], schedule: list[list[int]], modulus: gmpy2.mpz) -> gmpy2.mpz:
    """prod_i bases[i]**e_i mod modulus, where ``schedule = bit_schedule(e)``."""
    acc = gmpy2.mpz(1)
    for indices in schedule:
        acc = acc * acc % modulus
        for i in indices:
            acc = acc * bases[i] % modulus
    return acc
