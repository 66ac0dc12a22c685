"""Check an upload from its first bytes while it streams in, before any of it is stored or parsed by a library.

A body that cannot be a valid message for this model (wrong magic, version, kind, plan, parameter fingerprint,
part count, or a part or key declaring more bytes than the model's keys or inputs can have) is refused as soon as
the bytes that show it have arrived, so garbage never reaches the disk, a worker or SEAL. What is checked is the
framing of protocol v1 (docs/protocol.md), hybrid keys' key envelope version 2 (4.12) included; the worker still
validates every byte (CRCs, coefficients, SEAL).

``StreamCheck(rules, what).feed(chunk)`` raises ``ServiceError`` (422, or 413 for sizes) on the first chunk that
proves the body wrong; ``finish()`` checks that the body ended exactly where its framing says.
"""

from __future__ import annotations

import struct
from typing import Any

from medhe.service.errors import ServiceError

CKKS_MAGIC, CKKS_VERSION = b"MHCK", 1
CKKS_KIND_INPUT, CKKS_KIND_KEYS = 1, 2
SEAL_FRAME_MAGIC, SEAL_FRAME_VERSION = b"MHSC", 1
SEAL_KIND_CIPHERTEXT, SEAL_KIND_GALOIS, SEAL_KIND_RELIN = 1, 2, 3
_ENVELOPE = struct.Struct("<4sBB16sH")  # 24 bytes
_FRAME = struct.Struct("<4sBBH16sII")  # 32 bytes
PAILLIER_MAGIC, PAILLIER_VERSION = b"MHPL", 1
PAILLIER_KIND_KEY, PAILLIER_KIND_FEATURES = 1, 2
_PAILLIER = struct.Struct(">4sBB16sIHHHI")  # 36 bytes
TFHE_MAGIC, TFHE_VERSION = b"MHTF", 1
TFHE_KIND_KEYS, TFHE_KIND_INPUT = 1, 2
_TFHE = struct.Struct("<4sBB16sQI")  # 34 bytes: medhe.he.tfhe.wire's frame (the Concrete payload follows)


def _bad(what: str, why: str) -> ServiceError:
    return ServiceError(422, "bad_ciphertext", f"{what} {why}")


class StreamCheck:
    """Incremental validator of one body; ``rules`` from ``limits.rules_for`` (None: size limits only)."""

    def __init__(self, rules: dict[str, Any] | None, kind: str, what: str):
        self.rules, self.kind, self.what = rules, kind, what
        self.buf = bytearray()  # only the bytes not yet judged (headers), never the payload
        self.seen = 0
        self.expected_total: int | None = None
        scheme = rules.get("scheme") if rules else None
        self._step = {"ckks": self._ckks, "paillier": self._paillier, "tfhe": self._tfhe}.get(scheme)
        self._state: Any = None

    def feed(self, chunk: bytes) -> None:
        start = self.seen
        self.seen += len(chunk)
        if self.expected_total is not None and self.seen > self.expected_total:
            raise _bad(self.what, f"has bytes past the end its framing declares ({self.expected_total} bytes): "
                                  "send exactly the bytes of one message")
        if self._step is None:
            return
        self._step(chunk, start)

    def finish(self) -> None:
        if self.expected_total is not None and self.seen != self.expected_total:
            raise _bad(self.what, f"is truncated ({self.seen} of the {self.expected_total} bytes its framing "
                                  "declares): send the complete message")
        if self._step is not None and self._state is None and self.rules is not None:
            raise _bad(self.what, "is too short to hold its header: send the complete message")
        if self._step == self._ckks and not self._state["done"]:
            raise _bad(self.what, "is truncated (fewer parts than its header declares): send the complete message")

    # -- CKKS: envelope, then per part a u32 length and the compact SEAL frame header --------------------------------
    def _ckks(self, chunk: bytes, start: int) -> None:
        st = self._state
        if st is None:
            st = self._state = {"part": -1, "count": None, "need": _ENVELOPE.size, "head": True,
                                "skip": 0, "sizes": [], "done": False}
        data = memoryview(chunk)
        while data:
            if st["done"]:
                raise _bad(self.what, "has bytes after its last part: send exactly the bytes of one message")
            if st["skip"]:  # inside a part's payload: nothing to look at
                n = min(st["skip"], len(data))
                st["skip"] -= n
                data = data[n:]
                if not st["skip"]:
                    self._next_part(st)
                continue
            take = min(st["need"] - len(self.buf), len(data))
            self.buf += data[:take]
            data = data[take:]
            if len(self.buf) < st["need"]:
                return
            self._ckks_header(st)

    def _next_part(self, st: dict) -> None:
        st["part"] += 1
        if st["part"] < st["count"]:
            st["need"], st["head"] = 4, True
        else:  # the last part is complete: nothing may follow
            st["done"] = True
            self.expected_total = self._consumed(st)

    def _consumed(self, st: dict) -> int:
        return _ENVELOPE.size + sum(4 + s for s in st["sizes"])

    def _ckks_header(self, st: dict) -> None:
        r, what = self.rules, self.what
        buf = bytes(self.buf)
        self.buf.clear()
        if st["count"] is None:  # the envelope
            magic, version, kind, plan, count = _ENVELOPE.unpack(buf)
            want = CKKS_KIND_KEYS if self.kind == "keys" else CKKS_KIND_INPUT
            if magic != CKKS_MAGIC:
                raise _bad(what, f"does not start with the CKKS envelope magic {CKKS_MAGIC!r}: send the bytes of "
                                 "a protocol v1 CKKS message (docs/protocol.md)")
            hybrid = self.kind == "keys" and version == r.get("key_envelope") == 2  # 4.12: hybrid keys
            if self.kind == "keys" and r.get("key_envelope") == 2 and version == CKKS_VERSION:
                raise _bad(what, "use key envelope version 1 (SEAL's key format), but this model's spec announces "
                                 "key envelope version 2 (hybrid keys): create the keys with this server's spec")
            if version != CKKS_VERSION and not hybrid:
                raise _bad(what, f"uses envelope version {version}; this server reads {CKKS_VERSION}")
            if kind != want:
                raise _bad(what, f"is envelope kind {kind}, expected {want} ({self.kind})")
            if plan != bytes.fromhex(r["plan_id"])[:16].ljust(16, b"\0"):
                raise _bad(what, "was made for another model or parameter set (plan id differs): fetch this "
                                 "server's spec, then create keys and encrypt again")
            if hybrid:
                if not 2 <= count <= r["key_max_parts"]:
                    raise _bad(what, f"declares {count} parts; this model's hybrid keys have an index and 1 to "
                                     f"{r['key_max_parts'] - 1} digit frames")
            else:
                expected = 2 if self.kind == "keys" else r["input_ciphertexts"]
                if count != expected:
                    raise _bad(what, f"declares {count} parts; this model's {self.kind} have {expected}")
            st["hybrid"] = hybrid
            st["count"], st["part"] = count, -1
            self._next_part(st)
            return
        if st["head"] and len(buf) == 4:  # a part's length
            (size,) = struct.unpack("<I", buf)
            limit = self._part_limit(st["part"])
            if size > limit:
                raise ServiceError(413, "body_too_large", f"{what}: part {st['part']} declares {size} bytes, more "
                                                          f"than this model's {self.kind} can have ({limit})")
            st["sizes"].append(size)
            if st["hybrid"] and st["part"] == 0:  # the index: u32 count, 6 bytes per key (the worker reads it)
                if size < 4:
                    raise _bad(what, f"has an index of {size} bytes; it holds at least its u32 count")
                st["skip"], st["head"] = size, False
                return
            if size == 0:
                if self.kind != "keys" or st["part"] != 1 or st["hybrid"]:
                    raise _bad(what, f"has an empty part {st['part']}")
                self._next_part(st)
                return
            if size < _FRAME.size:
                raise _bad(what, f"part {st['part']} is too short ({size} bytes) to be a compact SEAL frame")
            st["need"], st["head"], st["size"] = _FRAME.size, False, size
            return
        magic, version, kind, flags, fingerprint, _crc, skeleton = _FRAME.unpack(buf)
        if st["hybrid"]:
            want = SEAL_KIND_CIPHERTEXT  # each digit is a seeded ciphertext of the key context
        elif self.kind == "keys":
            want = SEAL_KIND_GALOIS if st["part"] == 0 else SEAL_KIND_RELIN
        else:
            want = SEAL_KIND_CIPHERTEXT
        if magic != SEAL_FRAME_MAGIC or version != SEAL_FRAME_VERSION:
            raise _bad(what, f"part {st['part']} is not a compact SEAL frame ({SEAL_FRAME_MAGIC!r} version "
                             f"{SEAL_FRAME_VERSION})")
        if kind != want:
            raise _bad(what, f"part {st['part']} is frame kind {kind}, expected {want}")
        if flags not in (0, 1) or (flags == 1 and self.kind != "keys"):
            raise _bad(what, f"part {st['part']} has unknown flags {flags}")
        if fingerprint.hex() != (r["key_fingerprint"] if st["hybrid"] else r["fingerprint"]):
            raise _bad(what, f"part {st['part']} was made for other encryption parameters (fingerprint differs)")
        if skeleton > st["size"] - _FRAME.size:
            raise _bad(what, f"part {st['part']} declares a skeleton longer than the part")
        st["skip"] = st["size"] - _FRAME.size
        if not st["skip"]:
            self._next_part(st)

    def _part_limit(self, part: int) -> int:
        r = self.rules
        if self.kind != "keys":
            return r["input_part_bytes"]
        if self._state.get("hybrid"):
            return r["index_part_bytes"] if part == 0 else r["digit_part_bytes"]
        return r["galois_part_bytes"] if part == 0 else r["relin_part_bytes"]

    # -- Paillier: one fixed header that says exactly how long the message is ----------------------------------------
    def _paillier(self, chunk: bytes, start: int) -> None:
        if self._state is not None:
            return
        need = _PAILLIER.size - len(self.buf)
        self.buf += chunk[:need]
        if len(self.buf) < _PAILLIER.size:
            return
        r, what = self.rules, self.what
        magic, version, kind, _fp, count, _scale, _sb, _slots, width = _PAILLIER.unpack(bytes(self.buf))
        self.buf.clear()
        self._state = True
        want = PAILLIER_KIND_KEY if self.kind == "keys" else PAILLIER_KIND_FEATURES
        if magic != PAILLIER_MAGIC or version != PAILLIER_VERSION:
            raise _bad(what, f"is not a protocol v1 Paillier message ({PAILLIER_MAGIC!r} version {PAILLIER_VERSION})")
        if kind != want:
            raise _bad(what, f"is Paillier kind {kind}, expected {want} ({self.kind})")
        max_bits = r["max_key_bits"]
        if self.kind == "keys":
            if count != 1:
                raise _bad(what, f"holds {count} integers; a Paillier key message holds exactly one modulus")
            if width * 8 > max_bits + 7:
                raise ServiceError(422, "unsupported_key_size",
                                   f"a Paillier modulus of up to {width * 8} bits is larger than the {max_bits}-bit "
                                   f"limit of this server; use a {min(3072, max_bits)}-bit key")
            floor = int(r.get("min_key_bits", 0))  # the worker refuses such a key too; this needs no spooling
            if 0 < width * 8 < floor:
                raise ServiceError(422, "rejected",
                                   f"a Paillier modulus of at most {width * 8} bits is below this model's "
                                   f"{floor}-bit floor (128-bit security); use a {floor}-bit key")
        else:
            if count != r["dim"]:
                raise _bad(what, f"holds {count} encrypted features; this model takes {r['dim']}")
            if width * 8 > 2 * max_bits + 7:
                raise ServiceError(422, "unsupported_key_size",
                                   f"ciphertexts of {width} bytes belong to a key above the {max_bits}-bit limit")
        if width == 0:
            raise _bad(what, "declares integers of width 0")
        self.expected_total = _PAILLIER.size + count * width + 16
        if self.seen > self.expected_total:
            raise _bad(what, f"has bytes past the {self.expected_total} its header declares")

    # -- TFHE: medhe's frame around Concrete's bytes declares the circuit and exactly how long the payload is --------
    def _tfhe(self, chunk: bytes, start: int) -> None:
        if self._state is not None:
            return
        need = _TFHE.size - len(self.buf)
        self.buf += chunk[:need]
        if len(self.buf) < _TFHE.size:
            return
        r, what = self.rules, self.what
        magic, version, kind, fp, length, _crc = _TFHE.unpack(bytes(self.buf))
        self.buf.clear()
        self._state = True
        want = TFHE_KIND_KEYS if self.kind == "keys" else TFHE_KIND_INPUT
        if magic != TFHE_MAGIC or version != TFHE_VERSION:
            raise _bad(what, f"is not a protocol v1 TFHE message ({TFHE_MAGIC!r} version {TFHE_VERSION}): send "
                             "the bytes of a medhe TFHE client (docs/protocol.md)")
        if kind != want:
            raise _bad(what, f"is TFHE kind {kind}, expected {want} ({self.kind})")
        if fp.hex() != r["fingerprint"][:32]:
            raise _bad(what, "was made for another circuit or parameters (fingerprint differs): fetch this "
                             "server's spec and make new keys")
        limit = r["key_bytes"] if self.kind == "keys" else r["input_bytes"]
        if _TFHE.size + length > limit:
            raise ServiceError(413, "body_too_large", f"{what} declares a {length}-byte payload, more than this "
                                                      f"model's {self.kind} can have ({limit - _TFHE.size})")
        self.expected_total = _TFHE.size + length
        if self.seen > self.expected_total:
            raise _bad(what, f"has bytes past the {self.expected_total} its header declares")
