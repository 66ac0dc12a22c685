"""Seeded form of SEAL objects, made by the secret-key holder (the client) to halve its uploads.

The second polynomial ``a`` of a fresh symmetric encryption (ciphertexts from the client, every key component) is
uniform, so SEAL can ship the 64-byte PRNG seed that generates it instead (SEAL's ``Serializable``). seal-python
does not expose that, so the secret-key holder rebuilds the same form from SEAL operations only: re-randomise with
a fresh SEAL encryption of zero, draw a fresh seed, let SEAL's own loader expand it to ``a``, and set
``c0 = (c0' + c1'·s) - a·s`` computed by SEAL's Decryptor (exact in RNS, no rounding). The result is SEAL's seeded
symmetric encryption (m + e - a·s, a) with fresh noise e; the receiver needs nothing new, since SEAL's loader
expands the seed.
"""

from __future__ import annotations

import os
import struct

import seal

from medhe.errors import CiphertextError
from medhe.he.ckks.wire.serialize import (_CT_META, _SEAL_HEADER, _SEAL_MAGIC, _U64, KIND_CIPHERTEXT, _Reader,
                                          compact)

_INFO_TYPE_BLAKE2XB = 1  # SEAL's prng_type::blake2xb
_SEED_BYTES = 64
_INFO_SIZE = _SEAL_HEADER.size + 1 + _SEED_BYTES


def _seal_header(size: int, major: int, minor: int) -> bytes:
    return _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, major, minor, 0, 0, size)


def _seeded_blob(meta: bytes, major: int, minor: int, c0: bytes, seed: bytes) -> bytes:
    """SEAL's serialization of a seeded ciphertext: metadata, c0 only, then UniformRandomGeneratorInfo."""
    dyn = _seal_header(_SEAL_HEADER.size + 8 + len(c0), major, minor) + _U64.pack(len(c0) // 8) + c0
    info = _seal_header(_INFO_SIZE, major, minor) + bytes([_INFO_TYPE_BLAKE2XB]) + seed
    body = meta + dyn + info
    return _seal_header(_SEAL_HEADER.size + len(body), major, minor) + body


class Seeder:
    """Client-side helper (holds the secret key) that re-encodes ciphertexts and keys in SEAL's seeded form.

    Roughly halves what is sent. Only the secret-key holder can do it (it needs c0 + c1·s), so it serves the
    client's uploads: its input ciphertexts and its Galois/relin keys. Each encoding adds a fresh encryption of
    zero, so sending one object several times (seeded or not) never reveals the key.
    """

    def __init__(self, context: seal.SEALContext, secret_key: seal.SecretKey) -> None:
        self.context = context
        self._secret_key = secret_key
        self._data_level = self._tools(context, secret_key)
        self._key_pid = struct.pack("<4Q", *context.key_context_data().parms_id())
        self._version = tuple(context.key_context_data().parms().to_bytes()[3:5])  # SEAL major, minor
        self._aux: tuple | None = None

    @staticmethod
    def _tools(context: seal.SEALContext, secret_key: seal.SecretKey) -> tuple:
        return (context, seal.Evaluator(context), seal.Decryptor(context, secret_key),
                seal.Encryptor(context, secret_key), seal.CKKSEncoder(context))

    def _key_level(self) -> tuple:
        """A context whose first data level has exactly our key-level primes, so SEAL decrypts key components.

        SEAL's Decryptor refuses the key level; appending one unused prime moves those primes to a data level.
        SEAL's 128-bit check would refuse the longer modulus, but nothing here ever lives modulo it: the client
        only decrypts key components and encrypts zeros at that data level, i.e. modulo the original key-level
        modulus, with the same secret s (its NTT residues per prime are identical in both contexts).
        """
        if self._aux is None:
            kparms = self.context.key_context_data().parms()
            n, moduli = kparms.poly_modulus_degree(), list(kparms.coeff_modulus())
            taken = {m.value() for m in moduli}
            extra = next(m for bits in range(60, 20, -1) for m in seal.CoeffModulus.Create(n, [bits])
                         if m.value() not in taken)
            parms = seal.EncryptionParameters(seal.scheme_type.ckks)
            parms.set_poly_modulus_degree(n)
            parms.set_coeff_modulus(moduli + [extra])
            aux = seal.SEALContext(parms, False, seal.sec_level_type.none)
            raw = self._secret_key.to_string()
            major, minor = raw[3], raw[4]
            coeff_count, scale = struct.unpack_from("<Qd", raw, _SEAL_HEADER.size + 32)
            data = raw[-coeff_count * 8:] + bytes(n * 8)  # s for the shared primes; zeros for the unused one
            body = (struct.pack("<4Q", *aux.key_context_data().parms_id()) + struct.pack("<Qd", coeff_count + n, scale)
                    + _seal_header(_SEAL_HEADER.size + 8 + len(data), major, minor) + _U64.pack(len(data) // 8) + data)
            sk = aux.from_secret_str(_seal_header(_SEAL_HEADER.size + len(body), major, minor) + body)
            self._aux = self._tools(aux, sk) + (struct.pack("<4Q", *aux.first_parms_id()),)
        return self._aux

    def _seeded(self, ct: seal.Ciphertext, meta: bytes, load_meta: bytes, level: tuple,
                private: bool = False) -> bytes:
        """Seeded blob for ``ct``: (0, a) from a fresh seed, then c0 = Dec(ct + Enc(0) - (0, a)).

        The added fresh encryption of zero matters: without it, two encodings of one ciphertext (two seeds, or
        seeded and plain) would differ by an exact multiple of s, with no noise, and give the secret key away.
        With it, every encoding carries independent fresh noise (std grows by sqrt(2), far below the scale).
        ``private``: ``ct`` is a fresh encryption that nobody else ever sees (see :meth:`encrypt`), so its own
        noise suffices.
        """
        context, evaluator, decryptor, encryptor, encoder = level[:5]
        _pid, _ntt, _polys, n, k, _scale, _corr = _CT_META.unpack(meta)
        fresh = ct
        if not private:
            zero_plain = encoder.encode(0.0, ct.scale())
            if list(zero_plain.parms_id()) != list(ct.parms_id()):
                evaluator.mod_switch_to_inplace(zero_plain, ct.parms_id())
            fresh = evaluator.add(ct, encryptor.encrypt_symmetric(zero_plain))
        seed = os.urandom(_SEED_BYTES)
        a = seal.Ciphertext()
        a.load_bytes(context, _seeded_blob(load_meta, *self._version, bytes(n * k * 8), seed))
        c0 = decryptor.decrypt(evaluator.sub(fresh, a)).to_bytes()[-n * k * 8:]
        return _seeded_blob(meta, *self._version, c0, seed)

    def seed_ciphertext(self, ct: seal.Ciphertext, private: bool = False) -> bytes:
        """SEAL bytes of a size-2 data-level ciphertext in seeded form: same message, plus fresh noise."""
        pid = struct.pack("<4Q", *ct.parms_id())
        if ct.size() != 2 or not ct.is_ntt_form() or pid == self._key_pid or \
                self.context.get_context_data(ct.parms_id()) is None:
            raise CiphertextError("only size-2 ciphertexts made with this context can be sent seeded: "
                                  "relinearize it, or send it without a Seeder")
        # CKKS ciphertexts always carry correction factor 1 (it is a BGV notion)
        meta = _CT_META.pack(pid, 1, 2, ct.poly_modulus_degree(), ct.coeff_modulus_size(), ct.scale(), 1)
        return self._seeded(ct, meta, meta, self._data_level, private)

    def encrypt(self, plain: seal.Plaintext) -> bytes:
        """Encrypt ``plain`` (secret key, SEAL) straight to compact seeded bytes: the cheapest way to upload.

        The intermediate ciphertext never leaves this call, so no re-randomisation is needed.
        """
        ct = self._data_level[3].encrypt_symmetric(plain)
        return compact(self.seed_ciphertext(ct, private=True), KIND_CIPHERTEXT, self.context)

    def seed_kswitch(self, raw: bytes, keep: dict[int, int] | None = None) -> bytes:
        """Galois/relin keys (SEAL bytes) -> the same keys with every component in seeded form.

        ``keep`` (as for :func:`compact`): digits above a key's kept level are dropped on the wire anyway, so they
        are not re-encrypted; they get a zero first polynomial and a fresh seed, only to keep SEAL's layout.
        """
        r = _Reader(raw, "keys")
        major, minor = raw[3], raw[4]
        r.take(_SEAL_HEADER.size)
        out = [bytes(r.take(32))]
        (outer,) = r.unpack(_U64)
        out.append(_U64.pack(outer))
        level = self._key_level()
        aux_pid = level[5]
        for index in range(outer):
            (inner,) = r.unpack(_U64)
            out.append(_U64.pack(inner))
            kept = inner if keep is None else keep.get(index, inner)
            for digit in range(inner):
                size = _SEAL_HEADER.unpack(r.buf[r.pos:r.pos + _SEAL_HEADER.size])[-1]
                blob = bytes(r.take(size))
                meta = blob[_SEAL_HEADER.size:_SEAL_HEADER.size + _CT_META.size]
                if meta[:32] != self._key_pid:
                    raise CiphertextError("keys hold a component at the wrong level: generate them again")
                if digit > kept:
                    n, k = _CT_META.unpack(meta)[3:5]
                    out.append(_seeded_blob(meta, *self._version, bytes(n * k * 8), os.urandom(_SEED_BYTES)))
                    continue
                ct = seal.Ciphertext()  # the component, relabelled to the helper context's matching data level
                ct.load_bytes(level[0], blob[:_SEAL_HEADER.size] + aux_pid + blob[_SEAL_HEADER.size + 32:])
                out.append(self._seeded(ct, meta, aux_pid + meta[32:], level))
        body = b"".join(out)
        return _seal_header(_SEAL_HEADER.size + len(body), major, minor) + body
