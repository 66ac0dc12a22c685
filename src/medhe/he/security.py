"""The 128-bit security floor for RLWE schemes (HomomorphicEncryption.org standard, classical, ternary secret).

Every parameter set medhe builds for CKKS passes through :func:`check_rlwe_128`, so nothing below 128 bits can be
constructed, whatever options a user passes. SEAL enforces the same table; checking it ourselves first gives a
one-line message that names the limit instead of SEAL's generic "parameters are not valid".
"""

from __future__ import annotations

from medhe.errors import SecurityError

#: ring degree N -> largest log2(Q*P) (all primes, special prime included) that keeps 128-bit security.
MAX_MODULUS_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: the standard's full table (classical attacks, ternary secret): security level -> {N: largest log2(Q*P)}
MAX_MODULUS_BITS = {128: MAX_MODULUS_BITS_128,
                    192: {4096: 75, 8192: 152, 16384: 305, 32768: 611},
                    256: {4096: 58, 8192: 118, 16384: 237, 32768: 476}}


def max_modulus_bits(poly_degree: int) -> int:
    """Largest total modulus (bits) allowed at 128-bit security for ring degree ``poly_degree``."""
    try:
        return MAX_MODULUS_BITS_128[int(poly_degree)]
    except KeyError:
        raise SecurityError(
            f"ring degree {poly_degree} has no 128-bit entry in the HomomorphicEncryption.org table; "
            f"use one of {', '.join(map(str, MAX_MODULUS_BITS_128))}") from None


def security_bits(poly_degree: int, modulus_bits: list[int] | tuple[int, ...]) -> int:
    """The highest security level of the table (128, 192 or 256 bits) that ``N`` and the modulus meet.

    Raises ``SecurityError`` below 128 bits, as :func:`check_rlwe_128` does.
    """
    check_rlwe_128(poly_degree, modulus_bits)
    total = int(sum(modulus_bits))
    return max(level for level, table in MAX_MODULUS_BITS.items() if total <= table[int(poly_degree)])


def check_rlwe_128(poly_degree: int, modulus_bits: list[int] | tuple[int, ...]) -> None:
    """Refuse (``SecurityError``) any RLWE parameter set whose log2(Q*P) exceeds the 128-bit limit for its N."""
    limit = max_modulus_bits(poly_degree)
    total = int(sum(modulus_bits))
    if total > limit:
        raise SecurityError(
            f"CKKS parameters N={poly_degree} with a {total}-bit modulus {list(modulus_bits)} are below 128-bit "
            f"security (limit {limit} bits for N={poly_degree}); use fewer or smaller primes or a larger ring degree")
