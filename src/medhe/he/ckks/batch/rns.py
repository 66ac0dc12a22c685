"""SEAL ciphertexts <-> RNS arrays (polynomials x primes x N uint64, NTT form), the batch kernels' data.

seal-python exposes no raw pointers, only SEAL's own serialization, whose ciphertext body is exactly this array
after a fixed-size header (SEAL header, metadata, array header, word count). Converting is one copy each way.
"""

from __future__ import annotations

import struct

import numpy as np
import seal

from medhe.errors import CiphertextError

_SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, total size
_META = struct.Struct("<4QBQQQdQ")  # parms_id, is_ntt_form, size, poly degree, primes, scale, correction factor
_COUNT = struct.Struct("<Q")
BODY_OFFSET = _HEADER.size + _META.size + _HEADER.size + _COUNT.size


def to_array(ct: seal.Ciphertext, out: np.ndarray | None = None) -> np.ndarray:
    """(size, primes, N) residues of ``ct`` (a copy, into ``out`` when given)."""
    raw = ct.to_string()
    magic, hsize, _major, _minor, compr, _res, _total = _HEADER.unpack_from(raw, 0)
    if magic != _SEAL_MAGIC or hsize != _HEADER.size or compr != 0:
        raise CiphertextError("SEAL produced an unexpected ciphertext encoding (compressed or not SEAL 4.x)")
    meta = _META.unpack_from(raw, _HEADER.size)
    size, degree, primes = meta[5], meta[6], meta[7]
    count = size * degree * primes
    view = np.frombuffer(raw, dtype=np.uint64, count=count, offset=BODY_OFFSET).reshape(size, primes, degree)
    if out is None:
        return view.copy()
    out[...] = view
    return out


def from_array(arr: np.ndarray, parms_id: list[int], scale: float, context: seal.SEALContext,
               version: tuple[int, int] = (4, 1)) -> seal.Ciphertext:
    """A SEAL ciphertext at ``parms_id`` holding ``arr`` (size, primes, N) in NTT form with ``scale``."""
    arr = np.ascontiguousarray(arr, dtype=np.uint64)
    size, primes, degree = arr.shape
    body = arr.tobytes()
    dyn_size = _HEADER.size + _COUNT.size + len(body)
    total = _HEADER.size + _META.size + dyn_size
    raw = b"".join([
        _HEADER.pack(_SEAL_MAGIC, _HEADER.size, version[0], version[1], 0, 0, total),
        _META.pack(*[int(p) for p in parms_id], 1, size, degree, primes, float(scale), 1),
        _HEADER.pack(_SEAL_MAGIC, _HEADER.size, version[0], version[1], 0, 0, dyn_size),
        _COUNT.pack(arr.size), body])
    ct = seal.Ciphertext()
    try:
        ct.load_bytes(context, raw)
    except (ValueError, RuntimeError) as exc:
        raise CiphertextError(f"SEAL refused a batch ciphertext ({exc}): the batch plan and its parameters "
                              "disagree") from None
    return ct


def seal_version(context: seal.SEALContext) -> tuple[int, int]:
    """(major, minor) SEAL writes into its headers (read from a throwaway serialization)."""
    raw = seal.Ciphertext(context).to_string()
    _magic, _hsize, major, minor, _c, _r, _t = _HEADER.unpack_from(raw, 0)
    return int(major), int(minor)


def residues(value: int, moduli: list[int]) -> np.ndarray:
    """An exact (possibly huge, signed) integer modulo each prime."""
    return np.array([int(value) % int(q) for q in moduli], dtype=np.uint64)
