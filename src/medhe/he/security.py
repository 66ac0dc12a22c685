"""Every security floor medhe enforces, for all three schemes, in one place.

CKKS (RLWE): every parameter set passes through :func:`check_rlwe_128` (HomomorphicEncryption.org table, classical,
ternary secret), so nothing below 128 bits can be constructed, whatever options a user passes. SEAL enforces the
same table; checking it ourselves first gives a one-line message that names the limit instead of SEAL's generic
"parameters are not valid".

TFHE: Concrete picks parameters for a requested level; medhe always asks for :data:`TFHE_SECURITY_BITS`.

Paillier (factoring): :func:`check_paillier_key_bits` refuses moduli below :data:`PAILLIER_MIN_KEY_BITS` (3072 bits,
128-bit; 2048-bit keys, ~112-bit, are refused since issue 32);
:func:`paillier_security_bits` maps a modulus size to its NIST SP 800-57 equivalent strength.
"""

from __future__ import annotations

import numpy as np

from medhe.errors import SecurityError

#: the level medhe asks Concrete for (and refuses to lower)
TFHE_SECURITY_BITS = 128
#: Paillier modulus sizes: the default, the floor medhe accepts (both ~128-bit: the threat model promises >= 128
#: bits for every parameter set, and 2048 bits is only ~112) and a sanity ceiling
PAILLIER_DEFAULT_KEY_BITS = 3072
PAILLIER_MIN_KEY_BITS = 3072
PAILLIER_MAX_KEY_BITS = 16384
#: NIST SP 800-57 Part 1, Table 2: factoring modulus bits -> comparable symmetric strength
_NIST_FACTORING = ((15360, 256), (7680, 192), (3072, 128), (2048, 112))

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


def check_paillier_key_bits(bits: int, where: str) -> int:
    """Refuse Paillier moduli below the floor (``SecurityError``) or of unusable size; returns ``bits`` as int."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise SecurityError(f"{where}: Paillier key size must be an integer number of bits, not {bits!r}")
    bits = int(bits)
    if bits < PAILLIER_MIN_KEY_BITS:
        strength = next((level for size, level in _NIST_FACTORING if bits >= size), None)
        about = f"about {strength}-bit security" if strength else "far below 112-bit security"
        raise SecurityError(f"{where}: a {bits}-bit Paillier modulus gives {about}, below medhe's 128-bit floor of "
                            f"{PAILLIER_MIN_KEY_BITS} bits (NIST SP 800-57): use {PAILLIER_DEFAULT_KEY_BITS} bits "
                            "or more")
    if bits > PAILLIER_MAX_KEY_BITS:
        raise SecurityError(f"{where}: a {bits}-bit Paillier modulus is larger than the {PAILLIER_MAX_KEY_BITS}-bit "
                            f"limit; use {PAILLIER_DEFAULT_KEY_BITS}")
    return bits


def paillier_security_bits(key_bits: int) -> int:
    """Symmetric-equivalent strength of a ``key_bits`` modulus (NIST SP 800-57), for reports."""
    bits = check_paillier_key_bits(key_bits, "security level")
    return next(level for size, level in _NIST_FACTORING if bits >= size)
