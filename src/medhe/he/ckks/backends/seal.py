"""The ``seal`` backend: every CKKS operation through Microsoft SEAL (seal-python).

Also the client's side of the protocol (key generation, encryption, decryption): those always come from SEAL.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import seal

from medhe.errors import CiphertextError, SecurityError
from medhe.he.ckks.backends.base import Backend
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.ckks.wire import serialize
from medhe.he.ckks.wire.seeder import Seeder


@lru_cache(maxsize=8)
def _context(poly_degree: int, prime_bits: tuple[int, ...]) -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.scheme_type.ckks)
    parms.set_poly_modulus_degree(poly_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(poly_degree, list(prime_bits)))
    ctx = seal.SEALContext(parms, True, seal.sec_level_type.tc128)
    if not ctx.parameters_set():
        raise SecurityError(f"SEAL refused N={poly_degree}, primes {list(prime_bits)}: "
                            f"{ctx.parameter_error_message()}; choose other parameters")
    return ctx


def seal_context(params: CKKSParams) -> seal.SEALContext:
    """The (cached) SEAL context of ``params``, built with SEAL's own 128-bit check switched on (hybrid chains:
    the client context of ``hybrid.sealctx``, data primes + the first special prime)."""
    params.validate()
    if params.hybrid:
        from medhe.he.ckks.hybrid import sealctx

        return sealctx.client_context(params.layout())
    return _context(params.poly_degree, tuple(params.prime_bits))


class SealBackend(Backend):
    """SEAL (seal-python) CKKS. Holds whichever keys this side is allowed to have."""

    name = "seal"

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.context = seal_context(params)
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self.slots = self.encoder.slot_count()
        self.parms_ids: dict[int, list[int]] = {}
        data = self.context.first_context_data()
        while data is not None:
            self.parms_ids[data.chain_index()] = data.parms_id()
            data = data.next_context_data()
        self.top = max(self.parms_ids)
        self._by_pid = {tuple(p): lvl for lvl, p in self.parms_ids.items()}
        self.galois_keys: seal.GaloisKeys | None = None
        self.relin_keys: seal.RelinKeys | None = None
        self._secret: seal.SecretKey | None = None
        self._encryptor: seal.Encryptor | None = None
        self._decryptor: seal.Decryptor | None = None
        self._seeder: Seeder | None = None

    def fresh(self) -> "SealBackend":
        return SealBackend(self.params)

    # -- keys (client side)
    def keygen(self, rotation_steps: list[int], relinearization: bool) -> None:
        gen = seal.KeyGenerator(self.context)
        self._secret = gen.secret_key()
        self._encryptor = seal.Encryptor(self.context, self._secret)
        self._decryptor = seal.Decryptor(self.context, self._secret)
        self._seeder = Seeder(self.context, self._secret)
        self.galois_keys = seal.GaloisKeys()
        if rotation_steps:
            gen.create_galois_keys(list(rotation_steps), self.galois_keys)
        self.relin_keys = gen.create_relin_keys() if relinearization else None

    def use_secret_key(self, secret: seal.SecretKey) -> None:
        """Adopt an existing secret key (the key holder's KEYDIR) instead of generating one; no evaluation keys."""
        self._secret = secret
        self._encryptor = seal.Encryptor(self.context, secret)
        self._decryptor = seal.Decryptor(self.context, secret)
        self._seeder = Seeder(self.context, secret)

    def secret_key_bytes(self) -> bytes:
        """SEAL's serialization of the secret key, for the key holder's own 0600 key file only."""
        if self._secret is None:
            raise SecurityError("no secret key: call keygen() first")
        return self._secret.to_string()

    def evaluation_key_bytes(self, levels: dict[str, Any] | None = None) -> tuple[bytes, bytes]:
        """(Galois keys, relinearization keys) in the compact wire format; no secret key material.

        The key holder sends them seeded (each uniform half replaced by its PRNG seed): half the bytes, and the
        server's SEAL loader expands them with no extra step. With the plan's ``levels`` (``Plan.key_levels``)
        each key is trimmed to the levels it is used at.
        """
        if self.galois_keys is None:
            raise SecurityError("no keys yet: call keygen() first")
        keep_g, keep_r = self.key_indices(levels) if levels else (None, None)
        gk = serialize.dump_galois_keys(self.galois_keys, self.context, self._seeder, keep_g)
        rk = (serialize.dump_relin_keys(self.relin_keys, self.context, self._seeder, keep_r)
              if self.relin_keys is not None else b"")
        return gk, rk

    def key_indices(self, levels: dict[str, Any]) -> tuple[dict[int, int], dict[int, int] | None]:
        """``Plan.key_levels`` as SEAL key index -> level maps (Galois keys, relinearization keys)."""
        galois = {serialize.galois_key_index(self.galois_element(int(step))): int(level)
                  for step, level in levels["galois"].items()}
        relin = int(levels["relin"])
        return galois, ({serialize.RELIN_KEY_INDEX: relin} if relin >= 0 else None)

    def load_evaluation_keys(self, galois: bytes, relin: bytes, levels: dict[str, Any] | None = None) -> None:
        """Load the client's keys; with the plan's ``levels``, keys trimmed below them are refused."""
        need_g, need_r = self.key_indices(levels) if levels else (None, None)
        self.galois_keys = serialize.load_galois_keys(galois, self.context, need_g)
        self.relin_keys = serialize.load_relin_keys(relin, self.context, need_r) if relin else None

    def has_rotation(self, step: int) -> bool:
        return self.galois_keys is not None and self.galois_keys.has_key(self.galois_element(step))

    # -- plaintexts and ciphertexts
    def encode(self, values: np.ndarray | float, level: int, scale: float) -> seal.Plaintext:
        if np.isscalar(values):
            plain = self.encoder.encode(float(values), float(scale))
        elif np.iscomplexobj(values):
            plain = self.encoder.encode_complex(np.ascontiguousarray(values, dtype=np.complex128), float(scale))
        else:
            plain = self.encoder.encode(np.ascontiguousarray(values, dtype=np.float64), float(scale))
        if level != self.top:
            self.evaluator.mod_switch_to_inplace(plain, self.parms_ids[level])
        return plain

    def encrypt(self, plain: seal.Plaintext) -> seal.Ciphertext:
        if self._encryptor is None:
            raise SecurityError("this session has no secret key: call keygen() first")
        return self._encryptor.encrypt_symmetric(plain)

    def encrypt_bytes(self, plain: seal.Plaintext) -> bytes:
        """Encrypt straight to seeded compact bytes (the client's upload: about half of :meth:`serialize`)."""
        if self._seeder is None:
            raise SecurityError("this session has no secret key: call keygen() first")
        return self._seeder.encrypt(plain)

    def decrypt(self, ct: seal.Ciphertext) -> np.ndarray:
        if self._decryptor is None:
            raise SecurityError("this session has no secret key: call keygen() first")
        return np.asarray(self.encoder.decode(self._decryptor.decrypt(ct)), dtype=np.float64)

    # -- arithmetic
    def add(self, a, b):
        return self.evaluator.add(a, b)

    def add_inplace(self, a, b) -> None:
        self.evaluator.add_inplace(a, b)

    def add_plain(self, a, p):
        return self.evaluator.add_plain(a, p)

    def negate(self, a):
        return self.evaluator.negate(a)

    def multiply_plain(self, a, p):
        return self.evaluator.multiply_plain(a, p)

    def multiply(self, a, b):
        return self.evaluator.multiply(a, b)

    def relinearize(self, a):
        return self.evaluator.relinearize(a, self.relin_keys)

    def rescale(self, a):
        return self.evaluator.rescale_to_next(a)

    def rotate(self, a, step: int):
        return self.evaluator.rotate_vector(a, int(step), self.galois_keys)

    def conjugate(self, a):
        return self.evaluator.complex_conjugate(a, self.galois_keys)

    def mod_switch(self, a, level: int):
        if self.level(a) == level:
            return a
        return self.evaluator.mod_switch_to(a, self.parms_ids[level])

    def level(self, ct) -> int:
        return self._by_pid.get(tuple(ct.parms_id()), -1)

    def scale(self, ct) -> float:
        return float(ct.scale())

    def serialize(self, ct) -> bytes:
        return serialize.dump_ciphertext(ct, self.context)

    def load_ciphertext(self, data: bytes) -> seal.Ciphertext:
        ct = serialize.load_ciphertext(data, self.context)
        if ct.size() != 2:
            raise CiphertextError(f"ciphertext has {ct.size()} polynomials, expected 2: send a fresh, "
                                  "relinearized ciphertext")
        return ct

    def secret_key_bytes_for_tests(self) -> bytes:
        """Raw secret key bytes, only so tests can prove evaluation keys never contain them."""
        if self._secret is None:
            raise SecurityError("no secret key")
        return self._secret.to_string()
