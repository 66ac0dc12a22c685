"""Fixed-point encoding of real features, weights and scores as Paillier plaintexts, and its exact error bound.

Scales are powers of two so they are exact in binary floating point:

    X_i = round(x_i * 2**fx)          (client, per feature)
    W_ji = round(w_ji * 2**fw)        (server, per weight)
    B_j = round(b_j * 2**(fx + fw))   (server, per bias)
    S_j = sum_i W_ji X_i + B_j        (computed on ciphertexts; Paillier decryption is exact)
    score_j = S_j / 2**(fx + fw)

so |score_j - (w_j . x + b_j)| <= 2**-(fx+1) ||w_j||_1 + 2**-(fw+1) ||x||_1 + d 2**-(fx+fw+2) + 2**-(fx+fw+1)
(the three rounding errors and their cross term; see docs/paillier.md). Signed values live in Z_n as residues
(v mod n, decoded back into (-n/2, n/2]). All outputs are packed into one plaintext, K bits per slot
(M = sum_j S_j 2**(jK)), so the server pays one re-randomisation and the client one decryption per image.
"""

from __future__ import annotations

import numpy as np

from medhe.errors import CiphertextError


def encode(values: np.ndarray, bits: int) -> list[int]:
    """round(v * 2**bits) as Python ints; ``values`` must be finite. Power-of-two scaling is exact in float64."""
    arr = np.asarray(values, dtype=np.float64)
    return [int(v) for v in np.rint(np.ldexp(arr, bits)).ravel()]


def to_residue(value: int, n: int) -> int:
    """A signed integer as a plaintext in Z_n (negatives become n - |v|)."""
    return value % n


def from_residue(m: int, n: int) -> int:
    """The signed integer a plaintext in Z_n stands for: values above n/2 are negative."""
    return m - n if m > n // 2 else m


def pack(slots: list[int], slot_bits: int) -> int:
    """sum_j s_j 2**(j K) for signed s_j with |s_j| < 2**(K-1)."""
    total = 0
    for j, s in enumerate(slots):
        total += s << (j * slot_bits)
    return total


def unpack(value: int, count: int, slot_bits: int) -> list[int]:
    """Inverse of ``pack``: peel off centred K-bit digits, lowest first (each borrow is carried up exactly)."""
    half, full = 1 << (slot_bits - 1), 1 << slot_bits
    out = []
    for _ in range(count):
        s = ((value + half) % full) - half
        out.append(s)
        value = (value - s) >> slot_bits
    if value != 0:
        raise CiphertextError("decrypted scores overflow their slots: the result does not belong to these "
                              "parameters (wrong key, or features outside the bound the server planned for)")
    return out


def slot_bits_for(weight_ints: np.ndarray, bias_ints: list[int], feature_bound: float, feature_bits: int) -> int:
    """Bits per slot so that no |S_j| can reach 2**(K-1) for any features with |x_i| <= feature_bound."""
    x_max = int(np.ceil(feature_bound * 2.0 ** feature_bits)) + 1
    worst = max(sum(abs(int(w)) for w in row) * x_max + abs(b) for row, b in zip(weight_ints, bias_ints))
    return max(worst.bit_length() + 2, 8)


def error_bound(weight: np.ndarray, features_l1: float | np.ndarray, feature_bits: int, weight_bits: int) -> np.ndarray:
    """Per-output bound on |decoded score - exact score| for the given ||x||_1 (scalar or per image)."""
    w = np.asarray(weight, dtype=np.float64)
    d = w.shape[1]
    fx, fw = feature_bits, weight_bits
    l1 = np.abs(w).sum(axis=1)
    x1 = np.asarray(features_l1, dtype=np.float64)[..., None]
    return (l1 * 2.0 ** -(fx + 1) + x1 * 2.0 ** -(fw + 1) + d * 2.0 ** -(fx + fw + 2) + 2.0 ** -(fx + fw + 1))
