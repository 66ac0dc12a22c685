"""The two SEAL contexts of a hybrid chain, and SEAL's byte layout of plaintexts and secret keys.

* The *client context* (data primes + the first special prime) is an ordinary SEAL CKKS context with SEAL's own
  128-bit check: SEAL encrypts inputs and decrypts results in it, so ciphertexts keep SEAL's layout.
* The *key context* (data primes + every special prime + one unused prime) exists so that SEAL's symmetric
  encryption can run modulo Q*P: its first data level is exactly Q*P. SEAL's check would count the unused prime,
  so it is built with SEAL's check off; nothing ever lives modulo the unused prime, and the real chain Q*P is
  checked against the 128-bit table by ``HybridLayout.check``. Both sides build it from the public layout alone
  (the unused prime is chosen deterministically), so the fingerprint of key frames matches.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np
import seal

from medhe.errors import SecurityError
from medhe.he.ckks.hybrid.layout import HybridLayout
from medhe.he.ckks.wire.serialize import _SEAL_HEADER, _U64


def _build(poly_degree: int, primes: tuple[int, ...], check: bool) -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.scheme_type.ckks)
    parms.set_poly_modulus_degree(int(poly_degree))
    parms.set_coeff_modulus([seal.Modulus(int(p)) for p in primes])
    level = seal.sec_level_type.tc128 if check else seal.sec_level_type.none
    ctx = seal.SEALContext(parms, check, level)
    if not ctx.parameters_set():
        raise SecurityError(f"SEAL refused N={poly_degree} with primes {list(primes)}: "
                            f"{ctx.parameter_error_message()}; choose other parameters")
    return ctx


def unused_prime(poly_degree: int, taken: tuple[int, ...]) -> int:
    """The largest NTT-friendly prime (60 bits down) that is not in the chain: the key context's filler."""
    for bits in range(60, 20, -1):
        for m in seal.CoeffModulus.Create(int(poly_degree), [bits]):
            if m.value() not in taken:
                return int(m.value())
    raise SecurityError("no spare NTT-friendly prime for this ring")  # pragma: no cover - 40 sizes to choose from


@lru_cache(maxsize=8)
def client_context(layout: HybridLayout) -> seal.SEALContext:
    layout.check()
    return _build(layout.poly_degree, layout.data_primes + layout.special_primes[:1], True)


@lru_cache(maxsize=8)
def key_context(layout: HybridLayout) -> seal.SEALContext:
    layout.check()
    primes = layout.primes
    return _build(layout.poly_degree, primes + (unused_prime(layout.poly_degree, primes),), False)


def version(context: seal.SEALContext) -> tuple[int, int]:
    """SEAL's (major, minor) as its serializations write them."""
    raw = context.key_context_data().parms().to_bytes()
    return raw[3], raw[4]


def pid_bytes(parms_id) -> bytes:
    return struct.pack("<4Q", *parms_id)


def plain_bytes(parms_id: bytes, residues: np.ndarray, major: int, minor: int, scale: float = 1.0) -> bytes:
    """SEAL's serialization of a Plaintext (also a SecretKey's) holding ``residues`` (limbs x n, NTT form)."""
    data = np.ascontiguousarray(residues, dtype=np.uint64).tobytes()

    def header(size: int) -> bytes:
        return _SEAL_HEADER.pack(0xA15E, _SEAL_HEADER.size, major, minor, 0, 0, size)

    body = (parms_id + struct.pack("<Qd", len(data) // 8, scale)
            + header(_SEAL_HEADER.size + 8 + len(data)) + _U64.pack(len(data) // 8) + data)
    return header(_SEAL_HEADER.size + len(body)) + body


def plain_residues(raw: bytes, limbs: int, n: int) -> np.ndarray:
    """The (limbs, n) residues of SEAL's serialization of a Plaintext or SecretKey."""
    count = limbs * n
    (declared,) = struct.unpack_from("<Q", raw, _SEAL_HEADER.size + 32)
    if declared != count:
        raise ValueError(f"plaintext holds {declared} coefficients, expected {count}")
    return np.frombuffer(raw, dtype=np.uint64, count=count, offset=len(raw) - count * 8).reshape(limbs, n)


def cipher_residues(raw: bytes, limbs: int, n: int) -> np.ndarray:
    """The (2, limbs, n) residues of SEAL's (unseeded) serialization of a size-2 Ciphertext."""
    count = 2 * limbs * n
    return np.frombuffer(raw, dtype=np.uint64, count=count, offset=len(raw) - count * 8).reshape(2, limbs, n)
