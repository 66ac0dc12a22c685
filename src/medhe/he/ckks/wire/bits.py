"""Bit packing of RNS coefficients: each prime's residues with exactly ``q.bit_length()`` bits.

SEAL stores every coefficient in a 64-bit word; packing to the prime's width is where the compact wire format
(``serialize``) saves most of its bytes. Coefficients are grouped by prime width so that a few large vectorised
pack calls replace one per prime per key component.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medhe.errors import CiphertextError


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers ``< 2**bits`` using exactly ``bits`` bits each (LSB first, little-endian).

    64 values fill exactly ``bits`` 64-bit words, and where each value lands in its group is the same for every
    group, so packing is 64 vectorised shift-or passes over all groups at once (about 1 ms per 100k values).
    """
    v = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    n = v.size
    if bits >= 64:
        return v.tobytes()
    groups = -(-n // 64)
    if groups * 64 != n:
        v = np.concatenate([v, np.zeros(groups * 64 - n, dtype="<u8")])
    cols = np.ascontiguousarray(v.reshape(groups, 64).T)  # cols[i]: the i-th value of every group
    words = np.zeros((bits, groups), dtype="<u8")
    for i in range(64):
        w, shift = divmod(i * bits, 64)
        words[w] |= cols[i] << np.uint64(shift)
        if shift + bits > 64:
            words[w + 1] |= cols[i] >> np.uint64(64 - shift)
    return np.ascontiguousarray(words.T).tobytes()[:_packed_len(n, bits)]


def unpack_bits(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` uint64 values from ``ceil(count*bits/8)`` bytes.

    This runs on the server's request path, once per input coefficient, so it is kept to a few passes over the
    data. 8 values take exactly ``bits`` bytes, and the k-th value of every such group starts at the same bit of
    its group: for widths up to 57 (shift + width <= 64), one unaligned little-endian 64-bit read with a byte stride
    of ``bits`` gathers the k-th value of all groups at once, so 8 shift-and-mask passes unpack everything.
    """
    if bits >= 64:
        return np.frombuffer(data, dtype="<u8", count=count).copy()
    nbytes = _packed_len(count, bits)
    if bits > 57:
        return _unpack_wide(data, count, bits, nbytes)
    groups = -(-count // 8)
    buf = np.zeros(groups * bits + 8, dtype=np.uint8)  # 8 spare bytes: the last group's reads run past its end
    buf[:nbytes] = np.frombuffer(data, dtype=np.uint8, count=nbytes)
    out = np.empty((groups, 8), dtype="<u8")
    mask = np.uint64((1 << bits) - 1)
    for k in range(8):
        byte, shift = divmod(k * bits, 8)
        column = np.ndarray((groups,), dtype="<u8", buffer=buf, offset=byte, strides=(bits,))
        np.bitwise_and(column >> np.uint64(shift), mask, out=out[:, k])
    return out.reshape(-1)[:count]


def _unpack_wide(data: bytes | memoryview, count: int, bits: int, nbytes: int) -> np.ndarray:
    """:func:`unpack_bits` for widths 58..63, where a value can straddle 9 bytes: value ``i`` starts at bit
    ``i*bits`` and is gathered from the two 64-bit words it can straddle."""
    words = np.zeros(-(-count * bits // 64) + 1, dtype="<u8")  # one spare word: the last value's "next" word
    words.view(np.uint8)[:nbytes] = np.frombuffer(data, dtype=np.uint8, count=nbytes)
    start = np.arange(count, dtype=np.uint64) * np.uint64(bits)
    index = (start >> np.uint64(6)).astype(np.intp)
    shift = start & np.uint64(63)
    out = words[index] >> shift
    # (w << 1) << (63 - shift) == w << (64 - shift), and is 0 when shift == 0 (a shift by 64 is undefined)
    out |= (words[index + 1] << np.uint64(1)) << (np.uint64(63) - shift)
    out &= np.uint64((1 << bits) - 1)
    return out


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8

@dataclass
class _Array:
    """One run of RNS coefficients: ``polys`` polynomials, each ``len(moduli)`` primes x ``degree`` coefficients."""

    moduli: list[int]
    polys: int
    degree: int

    @property
    def count(self) -> int:
        return self.polys * len(self.moduli) * self.degree


_CHUNK = 1 << 18  # values per pack call; a multiple of 64, so chunk outputs concatenate byte-exactly


def _width_counts(arrays: list[_Array]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for arr in arrays:
        for q in arr.moduli:
            counts[q.bit_length()] = counts.get(q.bit_length(), 0) + arr.polys * arr.degree
    return dict(sorted(counts.items()))


def _payload_len(arrays: list[_Array]) -> int:
    return sum(_packed_len(n, bits) for bits, n in _width_counts(arrays).items())


def _pack_payload(blocks: list[tuple[_Array, memoryview]]) -> bytes:
    """Every coefficient, grouped by prime bit width (ascending), each group one continuous bit stream.

    Grouping makes a few large pack calls instead of one per prime per key component (keys have hundreds).
    """
    counts = _width_counts([arr for arr, _ in blocks])
    streams = {bits: np.empty(n, dtype="<u8") for bits, n in counts.items()}
    pos = dict.fromkeys(counts, 0)
    for arr, raw in blocks:
        data = np.frombuffer(raw, dtype="<u8", count=arr.count).reshape(arr.polys, len(arr.moduli), arr.degree)
        for j, q in enumerate(arr.moduli):
            block, bits = data[:, j, :], q.bit_length()
            if int(block.max(initial=0)) >= q:
                raise CiphertextError("SEAL object holds a coefficient outside its prime: it is corrupted; "
                                      "re-create it with SEAL")
            streams[bits][pos[bits]:pos[bits] + block.size] = block.reshape(-1)
            pos[bits] += block.size
    return b"".join(pack_bits(stream[i:i + _CHUNK], bits)
                    for bits, stream in streams.items() for i in range(0, stream.size, _CHUNK))


def _unpack_payload(arrays: list[_Array], payload: memoryview, what: str) -> list[bytes]:
    """Inverse of :func:`_pack_payload`: SEAL's raw coefficient bytes per array, each checked against its prime."""
    streams, offset = {}, 0
    for bits, n in _width_counts(arrays).items():
        parts = []
        for i in range(0, n, _CHUNK):
            m = min(_CHUNK, n - i)
            parts.append(unpack_bits(payload[offset:offset + _packed_len(m, bits)], m, bits))
            offset += _packed_len(m, bits)
        streams[bits] = np.concatenate(parts) if parts else np.empty(0, dtype="<u8")
    pos = dict.fromkeys(streams, 0)
    out = []
    for arr in arrays:
        data = np.empty((arr.polys, len(arr.moduli), arr.degree), dtype="<u8")
        for j, q in enumerate(arr.moduli):
            bits, size = q.bit_length(), arr.polys * arr.degree
            block = streams[bits][pos[bits]:pos[bits] + size]
            pos[bits] += size
            if int(block.max(initial=0)) >= q:
                raise CiphertextError(f"{what} holds a coefficient outside its prime: the bytes were garbled in "
                                      "transit or made for other parameters; send them again")
            data[:, j, :] = block.reshape(arr.polys, arr.degree)
        out.append(data.tobytes())
    return out
