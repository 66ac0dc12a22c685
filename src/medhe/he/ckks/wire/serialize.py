"""Compact, lossless wire format for SEAL ciphertexts and keys.

SEAL stores every RNS coefficient in a 64-bit word although a prime has only 20-60 bits, and the zstd/zlib
compression that would shrink that is not compiled into seal-python. So we parse SEAL's own (uncompressed)
serialization, pack each prime's coefficients with exactly ``q.bit_length()`` bits, and keep everything else
(headers, parms_ids, scales, seeds) as a zlib-compressed "skeleton". Decoding rebuilds SEAL's bytes exactly, so
SEAL's own loader still does the final validation; before that we check the frame, the parameter fingerprint,
a CRC, every parms_id against the context and every coefficient against its prime, and raise
``CiphertextError`` with a one-line reason on any mismatch.

The client can halve its uploads again with a ``seeder.Seeder`` (it holds the secret key): fresh ciphertexts and
key components are sent in SEAL's seeded form, where the uniform polynomial is replaced by its 64-byte PRNG seed.
The server needs nothing extra: SEAL's loader expands seeds.

Keys can also be *level-trimmed* (``keep``: SEAL key index -> highest level the plan uses that key at). SEAL's key
switching at level l reads only decomposition digits 0..l and, in each, primes 0..l and the special prime; a key
that a plan only uses low in the chain is sent without the rest, which the receiver refills with zeros. That is
not lossless for the SEAL object, but exact for every operation the plan performs (the output ciphertexts are
bit-identical), and the server refuses keys trimmed below what its plan needs (``need``). The frame's reserved
field is 1 for trimmed keys, whose skeleton carries one kept-level byte per key.

    seeder = Seeder(context, keygen.secret_key())          # client only
    data = seeder.encrypt(plain)                           # ~0.23x SEAL's raw ciphertext bytes at N=8192
    gk = dump_galois_keys(galois_keys, context, seeder)    # ~0.24x SEAL's raw key bytes
    ct = load_ciphertext(data, context)                    # server; CiphertextError on anything wrong

Wire frame (little-endian)::

    b"MHSC" | format u8 | kind u8 | reserved u16 | fingerprint 16 B | crc32 u32 (of the rest) |
    skeleton_len u32 | zlib(skeleton) | packed coefficients (one bit stream per prime bit width, narrowest first)
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import TYPE_CHECKING

import seal

from medhe.errors import CiphertextError
from medhe.he.ckks.wire.bits import _Array, _pack_payload, _payload_len, _unpack_payload
from medhe.he.framing import Framing

if TYPE_CHECKING:
    from medhe.he.ckks.wire.seeder import Seeder

MAGIC = b"MHSC"
FORMAT_VERSION = 1
KIND_CIPHERTEXT, KIND_GALOIS, KIND_RELIN, KIND_PUBLIC = 1, 2, 3, 4
KIND_NAMES = {KIND_CIPHERTEXT: "ciphertext", KIND_GALOIS: "Galois keys", KIND_RELIN: "relinearization keys",
              KIND_PUBLIC: "public key"}

_FRAME = struct.Struct("<4sBBH16sII")  # magic, format, kind, reserved, fingerprint, crc32, skeleton_len
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header_size, major, minor, compr_mode, reserved, size
_CT_META = struct.Struct("<32sBQQQdQ")  # parms_id, is_ntt_form, size, poly_degree, coeff_mod_size, scale, corr.
_U64 = struct.Struct("<Q")
FRAMING = Framing("CKKS", MAGIC, FORMAT_VERSION, KIND_NAMES)
_MAX_SKELETON = 16 << 20  # a real skeleton is a few KB (64 KB for all-steps Galois keys): refuse zlib bombs
_TRIMMED = 1  # frame reserved field: kswitch keys carry one kept-level byte per key
_FULL = 255  # kept-level byte of an untrimmed key


def params_fingerprint(context: seal.SEALContext) -> bytes:
    """16 bytes identifying the encryption parameters (hash of SEAL's key-level ``EncryptionParameters``)."""
    return hashlib.sha256(context.key_context_data().parms().to_bytes()).digest()[:16]



class _Reader:
    """Cursor over a byte string that raises ``CiphertextError`` instead of reading past the end."""

    def __init__(self, buf: bytes | memoryview, what: str) -> None:
        self.buf = memoryview(buf)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CiphertextError(f"{self.what} is truncated or malformed: send the complete bytes again")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))


class _Walker:
    """Walks SEAL bytes (encoding: coefficients inline) or a skeleton (decoding: coefficients in the payload).

    The same walk does both, so the two directions cannot disagree about the layout. ``out`` collects everything
    except coefficients: the skeleton when encoding, SEAL's bytes (with holes for the arrays) when decoding.
    """

    def __init__(self, context: seal.SEALContext, src: _Reader, payload: memoryview | None, what: str) -> None:
        self.context = context
        self.src = src
        self.payload = payload  # None while encoding
        self.out: list[bytes | None] = []  # decode: None marks where an array's coefficients go
        self.blocks: list[tuple[_Array, memoryview]] = []  # encode: arrays and their raw bytes
        self.arrays: list[_Array] = []  # decode: arrays in order
        self.what = what
        self.unseeded_extra = 0  # what expanding every seed back into a polynomial would add
        self.keep: dict[int, int] | None = None  # trimmed keys: key index -> kept level (encode: given; decode: read)

    def skeleton_byte(self, value: int | None) -> int:
        """A byte only the skeleton has (not part of SEAL's bytes): written while encoding, read while decoding."""
        if self.encoding:
            self.out.append(bytes([value]))
            return int(value)
        return self.src.take(1)[0]

    def skip(self, n: int) -> None:
        """Coefficients a trimmed key does not send: dropped while encoding, zeros while decoding."""
        if self.encoding:
            self.src.take(n)
        else:
            self.out.append(bytes(n))

    @property
    def encoding(self) -> bool:
        return self.payload is None

    def copy(self, n: int) -> memoryview:
        chunk = self.src.take(n)
        self.out.append(bytes(chunk))
        return chunk

    def seal_header(self) -> tuple[int, int]:
        """Copy one SEAL header; returns (declared total size, version major)."""
        magic, hsize, major, _minor, compr, _res, size = _SEAL_HEADER.unpack(self.copy(_SEAL_HEADER.size))
        if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size:
            raise CiphertextError(f"{self.what} is not SEAL data (bad header): send bytes produced by medhe")
        if compr != 0:
            raise CiphertextError(f"{self.what} uses SEAL compression mode {compr}; medhe expects none")
        if major != 4:
            raise CiphertextError(f"{self.what} comes from SEAL {major}.x; medhe needs SEAL 4.x")
        return size, major

    def moduli_for(self, parms_id: bytes) -> list[int]:
        pid = list(struct.unpack("<4Q", parms_id))
        data = self.context.get_context_data(pid)
        if data is None:
            raise CiphertextError(f"{self.what} was made for other encryption parameters: use keys and "
                                  "ciphertexts created for this model's parameters")
        return [m.value() for m in data.parms().coeff_modulus()]

    def ciphertext(self, primes: set[int] | None = None) -> bytes:
        """Ciphertext / PublicKey blob (only ``primes``' coefficients, by index, when given); returns its parms_id."""
        self.seal_header()
        parms_id, _ntt, polys, degree, k, _scale, _corr = _CT_META.unpack(self.copy(_CT_META.size))
        moduli = self.moduli_for(parms_id)
        if k != len(moduli) or degree != self.context.key_context_data().parms().poly_modulus_degree():
            raise CiphertextError(f"{self.what} does not match its parameters (ring or modulus count): "
                                  "re-create it for this model")
        if not 1 <= polys <= 16:
            raise CiphertextError(f"{self.what} declares {polys} polynomials: it is corrupted; send it again")
        self.seal_header()  # DynArray header
        (count,) = _U64.unpack(self.copy(_U64.size))
        full, seeded = polys * k * degree, k * degree
        if count == full:
            arr = _Array(moduli, polys, degree)
        elif count == seeded and polys == 2:
            arr = _Array(moduli, 1, degree)
        else:
            raise CiphertextError(f"{self.what} holds {count} coefficients where {full} were expected: "
                                  "it is corrupted; send it again")
        if primes is None:
            self.array(arr)
        else:
            for _ in range(arr.polys):
                for j, q in enumerate(moduli):
                    if j in primes:
                        self.array(_Array([q], 1, degree))
                    else:
                        self.skip(degree * 8)
        if arr.polys != polys:  # seeded: SEAL's UniformRandomGeneratorInfo follows (own header + members)
            info_size, _ = self.seal_header()
            self.copy(info_size - _SEAL_HEADER.size)
            self.unseeded_extra += arr.count * 8 - info_size
        return parms_id

    def array(self, arr: _Array) -> None:
        if self.encoding:
            self.blocks.append((arr, self.src.take(arr.count * 8)))
        else:
            self.arrays.append(arr)
            self.out.append(None)

    def kswitch_keys(self) -> None:
        self.seal_header()
        parms_id = bytes(self.copy(32))
        key_pid = struct.pack("<4Q", *self.context.key_context_data().parms_id())
        if parms_id != key_pid:
            raise CiphertextError(f"{self.what} was made for other encryption parameters: generate the keys "
                                  "again for this model")
        (outer,) = _U64.unpack(self.copy(_U64.size))
        if outer > 1 << 20:
            raise CiphertextError(f"{self.what} is corrupted (implausible key count): send it again")
        special = len(self.moduli_for(key_pid)) - 1
        for index in range(outer):
            (inner,) = _U64.unpack(self.copy(_U64.size))
            if inner > 64:
                raise CiphertextError(f"{self.what} is corrupted (implausible decomposition count): send it again")
            level = None
            if self.keep is not None and inner:
                level = self.skeleton_byte(self.keep.get(index, _FULL) if self.encoding else None)
                if level == _FULL:
                    level = None
                elif level >= inner:
                    raise CiphertextError(f"{self.what} is corrupted (kept level {level} of {inner}): send it again")
                if not self.encoding:
                    self.keep[index] = _FULL if level is None else level
            for digit in range(inner):
                primes = None if level is None else (set(range(level + 1)) | {special} if digit <= level else set())
                if self.ciphertext(primes) != key_pid:
                    raise CiphertextError(f"{self.what} holds a key component at the wrong level: it is "
                                          "corrupted; generate the keys again")


def _walk(kind: int, walker: _Walker) -> None:
    if kind in (KIND_GALOIS, KIND_RELIN):
        walker.kswitch_keys()
    else:
        walker.ciphertext()
    if walker.src.pos != len(walker.src.buf):
        raise CiphertextError(f"{walker.what} has {len(walker.src.buf) - walker.src.pos} unexpected trailing "
                              "bytes: send exactly the bytes medhe produced")


def _check_declared_sizes(raw: bytes, what: str) -> None:
    size = _SEAL_HEADER.unpack_from(raw, 0)[-1] if len(raw) >= _SEAL_HEADER.size else -1
    if size != len(raw):
        raise CiphertextError(f"{what} is truncated or malformed: send the complete bytes again")


# ---------------------------------------------------------------------------------------------------------------
# bytes <-> compact bytes


def compact(raw: bytes, kind: int, context: seal.SEALContext, keep: dict[int, int] | None = None) -> bytes:
    """SEAL's uncompressed serialization of a ``kind`` object -> medhe's compact frame.

    ``keep`` (keys only): SEAL key index -> highest level that key is used at; other keys are sent whole.
    """
    what = KIND_NAMES[kind]
    _check_declared_sizes(raw, what)
    if keep is not None and kind not in (KIND_GALOIS, KIND_RELIN):
        raise ValueError("only Galois and relinearization keys can be level-trimmed")
    walker = _Walker(context, _Reader(raw, what), None, what)
    walker.keep = keep
    _walk(kind, walker)
    skeleton = zlib.compress(b"".join(walker.out), 6)
    body = skeleton + _pack_payload(walker.blocks)
    crc = zlib.crc32(body)
    flags = 0 if keep is None else _TRIMMED
    return _FRAME.pack(MAGIC, FORMAT_VERSION, kind, flags, params_fingerprint(context), crc, len(skeleton)) + body


def expand(data: bytes, kind: int, context: seal.SEALContext, need: dict[int, int] | None = None) -> bytes:
    """medhe's compact frame -> SEAL's uncompressed serialization, byte-identical to what :func:`compact` got
    (for trimmed keys: with zeros where nothing was sent).

    ``need`` (keys): SEAL key index -> level the receiver will use that key at; a key trimmed below it is refused.
    """
    walker, payload = _decode(data, kind, context)
    if need and walker.keep is not None:
        short = [(walker.keep[i], level) for i, level in need.items()
                 if walker.keep.get(i, _FULL) != _FULL and walker.keep[i] < level]
        if short:
            kept, used = short[0]
            raise CiphertextError(f"{walker.what} were trimmed below what this model needs ({len(short)} key(s); one "
                                  f"is kept to level {kept} but used at level {used}): create the keys with this "
                                  "server's spec")
    coefficients = iter(_unpack_payload(walker.arrays, payload, walker.what))
    raw = b"".join(next(coefficients) if part is None else part for part in walker.out)
    _check_declared_sizes(raw, walker.what)
    return raw


def frame_kind(data: bytes) -> int:
    """The object kind (``KIND_*``) a compact frame declares; ``CiphertextError`` if it is not a frame."""
    if len(data) < _FRAME.size or bytes(data[:4]) != MAGIC:
        raise CiphertextError("not in medhe's compact HE format: send bytes produced by medhe")
    return data[5]


def raw_size(data: bytes, kind: int, context: seal.SEALContext) -> int:
    """Size of SEAL's own uncompressed serialization of the object in a compact frame (seeds expanded), without
    unpacking it: the "raw" figure that benchmarks put next to ``len(data)``, the bytes as sent."""
    walker, _ = _decode(data, kind, context)
    return (sum(len(b) for b in walker.out if b is not None) + sum(a.count * 8 for a in walker.arrays)
            + walker.unseeded_extra)


def _decode(data: bytes, kind: int, context: seal.SEALContext) -> tuple[_Walker, memoryview]:
    """Check the frame and walk its skeleton; returns the walker (skeleton parts, arrays) and the payload."""
    what = KIND_NAMES[kind]
    data, (_magic, _version, _kind, flags, fingerprint, crc, skel_len) = FRAMING.open(data, kind, _FRAME)
    if flags not in (0, _TRIMMED) or (flags == _TRIMMED and kind not in (KIND_GALOIS, KIND_RELIN)):
        raise CiphertextError(f"{what} has unknown flags {flags}: use the same medhe version on both sides")
    if fingerprint != params_fingerprint(context):
        raise CiphertextError(f"{what} was made for other encryption parameters: use keys and ciphertexts "
                              "created for this model's parameters")
    body = data[_FRAME.size:]
    if zlib.crc32(body) != crc:
        raise CiphertextError(f"{what} is truncated or garbled (checksum mismatch): send it again")
    if skel_len > len(body):
        raise CiphertextError(f"{what} is truncated or malformed: send the complete bytes again")
    try:
        inflater = zlib.decompressobj()
        skeleton = inflater.decompress(body[:skel_len], _MAX_SKELETON)
        if inflater.unconsumed_tail or not inflater.eof:
            raise zlib.error
    except zlib.error:
        raise CiphertextError(f"{what} is garbled (bad skeleton): send it again") from None
    payload = body[skel_len:]
    walker = _Walker(context, _Reader(skeleton, what), payload, what)
    walker.keep = {} if flags == _TRIMMED else None
    _walk(kind, walker)
    expected = _payload_len(walker.arrays)
    if len(payload) < expected:
        raise CiphertextError(f"{what} is truncated: send the complete bytes again")
    if len(payload) > expected:
        raise CiphertextError(f"{what} has unexpected trailing bytes: send exactly the bytes medhe produced")
    return walker, payload


# ---------------------------------------------------------------------------------------------------------------
# SEAL objects <-> compact bytes


def _load(what: str, fn):
    try:
        return fn()
    except (ValueError, RuntimeError, TypeError, IndexError, OverflowError) as exc:
        raise CiphertextError(f"SEAL rejected the {what} ({exc}): it does not fit these parameters; "
                              "re-create it for this model") from None


def dump_ciphertext(ct: seal.Ciphertext, context: seal.SEALContext, seeder: Seeder | None = None) -> bytes:
    """Compact bytes of a data-level ciphertext; with the client's ``seeder``, about half again.

    Without a seeder the round trip is byte-identical; with one, the loaded ciphertext holds the same message
    with fresh noise added (its uniform half is regenerated from the seed on load).
    """
    raw = ct.to_string() if seeder is None else seeder.seed_ciphertext(ct)
    return compact(raw, KIND_CIPHERTEXT, context)


def load_ciphertext(data: bytes, context: seal.SEALContext) -> seal.Ciphertext:
    """Validated ciphertext from :func:`dump_ciphertext` bytes; raises ``CiphertextError`` on any mismatch."""
    raw = expand(data, KIND_CIPHERTEXT, context)
    if list(struct.unpack_from("<4Q", raw, _SEAL_HEADER.size)) == list(context.key_context_data().parms_id()):
        raise CiphertextError("ciphertext is at the key level, not a data level: send a ciphertext made by "
                              "the client's encryptor")
    ct = seal.Ciphertext()
    _load("ciphertext", lambda: ct.load_bytes(context, raw))
    if not ct.is_ntt_form():  # SEAL loads it, but every CKKS operation assumes NTT form
        raise CiphertextError("ciphertext is not in NTT form, so it is not a CKKS ciphertext: send one made by "
                              "the client's encryptor")
    return ct


def galois_key_index(galois_element: int) -> int:
    """Where SEAL's GaloisKeys store the key of ``galois_element`` (its ``get_index``)."""
    return (int(galois_element) - 1) >> 1


RELIN_KEY_INDEX = 0  # SEAL's RelinKeys hold the key for s^2 at index 0


def dump_galois_keys(keys: seal.GaloisKeys, context: seal.SEALContext, seeder: Seeder | None = None,
                     keep: dict[int, int] | None = None) -> bytes:
    """Compact bytes of the client's keys; a ``seeder`` (same client's secret key) halves them again, ``keep``
    (key index -> highest level used) trims what the plan never reads."""
    raw = keys.to_string()
    return compact(raw if seeder is None else seeder.seed_kswitch(raw, keep), KIND_GALOIS, context, keep)


def load_galois_keys(data: bytes, context: seal.SEALContext, need: dict[int, int] | None = None) -> seal.GaloisKeys:
    raw = expand(data, KIND_GALOIS, context, need)
    return _load("Galois keys", lambda: context.from_galois_str(raw))


def dump_relin_keys(keys: seal.RelinKeys, context: seal.SEALContext, seeder: Seeder | None = None,
                    keep: dict[int, int] | None = None) -> bytes:
    """Compact bytes of the client's keys; a ``seeder`` (same client's secret key) halves them again."""
    raw = keys.to_string()
    return compact(raw if seeder is None else seeder.seed_kswitch(raw, keep), KIND_RELIN, context, keep)


def load_relin_keys(data: bytes, context: seal.SEALContext, need: dict[int, int] | None = None) -> seal.RelinKeys:
    raw = expand(data, KIND_RELIN, context, need)
    return _load("relinearization keys", lambda: context.from_relin_str(raw))


def dump_public_key(key: seal.PublicKey, context: seal.SEALContext) -> bytes:
    return compact(key.to_string(), KIND_PUBLIC, context)


def load_public_key(data: bytes, context: seal.SEALContext) -> seal.PublicKey:
    raw = expand(data, KIND_PUBLIC, context)
    return _load("public key", lambda: context.from_public_str(raw))
