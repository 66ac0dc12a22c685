"""Client-side generation of hybrid key-switching keys, composed from SEAL's samplers.

A key for the target s' (s(X^g) for a rotation, s^2 for relinearization) is, per digit j, an RLWE sample
(b_j, a_j) modulo Q*P with b_j + a_j s = P g_j s' + e_j, where g_j = 1 modulo the digit's primes and 0 modulo the
other data primes (the gadget) and P g_j = 0 modulo the special primes. medhe samples nothing itself:

* the secret s is SEAL's (``KeyGenerator`` in the key context, whose first level is Q*P): ternary, SEAL's
  distribution; the client context's secret key is the same s, i.e. its residues for the client's primes (the NTT
  of a prime's residue depends only on that prime and N, so the residues are shared word for word);
* each digit is SEAL's symmetric encryption (``Encryptor.encrypt_symmetric``: SEAL's uniform a, SEAL's clipped
  Gaussian error) of the plaintext P g_j s', which medhe computes from s by exact modular arithmetic;
* the uniform half is then replaced by a SEAL-expanded seed drawn from the OS CSPRNG (``Seeder``), halving the bytes
  sent; SEAL's loader on the server regenerates it.

The secret key never leaves this object except as SEAL's own secret-key serialization for the client's key file.
"""

from __future__ import annotations

import numpy as np
import seal

from medhe.he.ckks.hybrid import sealctx
from medhe.he.ckks.hybrid.layout import HybridLayout
from medhe.he.ckks.wire import serialize
from medhe.he.ckks.wire.seeder import Seeder


def mulmod(a: np.ndarray, b: np.ndarray | int, q: int) -> np.ndarray:
    """a * b mod q elementwise for uint64 arrays with entries < q < 2^61 (exact).

    The quotient is estimated in 80-bit long double (64-bit mantissa: off by at most one), the remainder computed
    in wrapping 64-bit arithmetic (exact modulo 2^64, and the true remainder lies in (-q, 2q)), then corrected.
    """
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    qq = np.uint64(q)
    quot = np.floor(a.astype(np.longdouble) * b.astype(np.longdouble) / np.longdouble(q)).astype(np.uint64)
    with np.errstate(over="ignore"):
        r = (a * b - quot * qq).view(np.int64)
    r = np.where(r < 0, r + np.int64(q), r)
    r = np.where(r >= np.int64(q), r - np.int64(q), r)
    return r.astype(np.uint64)


def _bit_reverse(x: np.ndarray, bits: int) -> np.ndarray:
    out = np.zeros_like(x)
    for i in range(bits):
        out |= ((x >> np.uint64(i)) & np.uint64(1)) << np.uint64(bits - 1 - i)
    return out


def galois_permutation(poly_degree: int, element: int) -> np.ndarray:
    """SEAL's NTT-domain automorphism X -> X^element: slot k of the result is slot ``table[k]`` of the input."""
    n = int(poly_degree)
    log_n = n.bit_length() - 1
    if element % 2 == 0 or not 0 < element < 2 * n:
        raise ValueError(f"invalid Galois element {element} for N={n}")
    rev = _bit_reverse(np.arange(n, 2 * n, dtype=np.uint64), log_n + 1)
    index = ((np.uint64(element) * rev) >> np.uint64(1)) & np.uint64(n - 1)
    return _bit_reverse(index, log_n).astype(np.int64)


class HybridKeyGenerator:
    """Holds the secret key; makes hybrid Galois and relinearization keys for one layout (the client only)."""

    def __init__(self, layout: HybridLayout) -> None:
        self.layout = layout.check()
        self.context = sealctx.client_context(layout)  # SEAL encrypts and decrypts here
        self.key_context = sealctx.key_context(layout)  # Q*P (+ the unused prime): where keys are sampled
        n, primes = layout.poly_degree, layout.primes
        self._secret_ext = seal.KeyGenerator(self.key_context).secret_key()
        raw = self._secret_ext.to_string()
        residues = sealctx.plain_residues(raw, len(primes) + 1, n)
        self._s = residues[:len(primes)].copy()  # s over Q*P, NTT form (the unused prime's limb dropped)
        major, minor = sealctx.version(self.key_context)
        client_limbs = np.concatenate([residues[:layout.levels], residues[layout.levels:layout.levels + 1]])
        key_pid = sealctx.pid_bytes(self.context.key_context_data().parms_id())
        self.secret_key = self.context.from_secret_str(sealctx.plain_bytes(key_pid, client_limbs, major, minor))
        self._version = (major, minor)
        self._first_pid = sealctx.pid_bytes(self.key_context.first_parms_id())
        self._encryptor = seal.Encryptor(self.key_context, self._secret_ext)
        self._seeder = Seeder(self.key_context, self._secret_ext)
        self._p_mod = [int(np.prod([p % q for p in layout.special_primes], dtype=object) % q)
                       for q in layout.data_primes]

    # -- targets
    def rotated_secret(self, element: int) -> np.ndarray:
        """s(X^element) over Q*P, NTT form."""
        return self._s[:, galois_permutation(self.layout.poly_degree, element)]

    def squared_secret(self) -> np.ndarray:
        """s^2 over Q*P, NTT form (a product of NTT slots, prime by prime)."""
        return np.stack([mulmod(self._s[i], self._s[i], q) for i, q in enumerate(self.layout.primes)])

    def gadget_target(self, target: np.ndarray, digit: int) -> np.ndarray:
        """P g_digit s': (P mod q_i) s'_i on the digit's primes, 0 on every other prime (special ones included)."""
        out = np.zeros_like(target)
        for i in self.layout.digit(digit):
            out[i] = mulmod(target[i], self._p_mod[i], self.layout.data_primes[i])
        return out

    # -- keys
    def switch_key(self, target: np.ndarray, digits: int | None = None) -> list[bytes]:
        """One key: per digit, SEAL's seeded serialization of SEAL's symmetric encryption of P g_j s' (the first
        ``digits`` only: a key used low in the chain needs no more)."""
        out = []
        for j in range(self.layout.dnum if digits is None else min(int(digits), self.layout.dnum)):
            raw = sealctx.plain_bytes(self._first_pid, self.gadget_target(target, j), *self._version)
            plain = self.key_context.from_plain_str(raw)
            ct = self._encryptor.encrypt_symmetric(plain)
            out.append(self._seeder.seed_ciphertext(ct, private=True))
        return out

    def galois_key(self, element: int, digits: int | None = None) -> list[bytes]:
        return self.switch_key(self.rotated_secret(int(element)), digits)

    def relin_key(self, digits: int | None = None) -> list[bytes]:
        return self.switch_key(self.squared_secret(), digits)

    def evaluation_keys(self, plan_id: str, need: dict[int, int]) -> bytes:
        """Key envelope version 2 for ``need`` (Galois element, 0 for relinearization -> highest level used):
        each key with the digits its level reads, seeded and bit-packed. Fresh seeds and errors on every call."""
        from medhe.he.ckks.hybrid import wire
        from medhe.he.ckks.hybrid.planner import digits_at

        keys = []
        for element, level in sorted(need.items()):
            digits = digits_at(level, self.layout.alpha)
            raw = self.relin_key(digits) if element == wire.RELIN else self.galois_key(element, digits)
            keys.append((element, level, self.compact_key(raw)))
        return wire.pack_keys(plan_id, keys)

    def compact_key(self, digits: list[bytes]) -> list[bytes]:
        """The wire form of one key's digits: medhe's compact, CRC-checked frames (seeded, bit-packed)."""
        return [serialize.compact(raw, serialize.KIND_CIPHERTEXT, self.key_context) for raw in digits]

    def decrypt_residues(self, raw: bytes) -> np.ndarray:
        """b + a s over Q*P (NTT form) of a key digit (SEAL's bytes, seeded or not): for tests of the keys."""
        ct = seal.Ciphertext()
        ct.load_bytes(self.key_context, raw)
        plain = seal.Decryptor(self.key_context, self._secret_ext).decrypt(ct)
        return sealctx.plain_residues(plain.to_bytes(), len(self.layout.primes), self.layout.poly_degree)

    def secret_residues_for_tests(self) -> np.ndarray:
        """s over Q*P (NTT form), only so tests can check the keys against it."""
        return self._s.copy()
