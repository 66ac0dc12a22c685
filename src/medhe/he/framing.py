"""The checks every medhe wire message starts with, shared by the CKKS, TFHE and Paillier formats.

Each scheme's header begins ``magic (4 bytes) | version u8 | kind u8``, followed by its own fields. Before any of
those fields is trusted, the bytes must be bytes, long enough for the header, carry the scheme's magic, the
version this medhe reads and the kind the caller expects. After it, every scheme makes the same three integrity
checks: the message is bound to this model or key (plan id, circuit or key fingerprint), its length is the one its
header states, and its checksum matches (CRC or digest: corruption in transit, not an active attacker). Doing all
of that here keeps the error messages (which users act on) the same for all three schemes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from medhe.errors import CiphertextError

_PREFIX = struct.Struct("<4sBB")  # magic, version, kind: the same bytes in every medhe header


@dataclass(frozen=True)
class Framing:
    """One scheme's message family: its magic, version and kind names (``label`` is how users know it)."""

    label: str
    magic: bytes
    version: int
    kinds: dict[int, str]

    def what(self, kind: int) -> str:
        return f"{self.label} {self.kinds[kind]}"

    def open(self, data: object, kind: int, header: struct.Struct) -> tuple[memoryview, tuple]:
        """``data`` as a memoryview and its unpacked ``header``, once the common prefix is what ``kind`` needs.

        Raises ``CiphertextError`` naming what is wrong and what to do.
        """
        what = self.what(kind)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CiphertextError(f"{what} must be bytes, got {type(data).__name__}")
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        if len(view) < header.size:
            raise CiphertextError(f"{what} is truncated ({len(view)} bytes): resend the complete bytes medhe produced")
        magic, version, got_kind = _PREFIX.unpack_from(view)
        if magic != self.magic:
            raise CiphertextError(f"not a medhe {self.label} message (bad magic {bytes(magic)!r}): send bytes made "
                                  f"by medhe's {self.label} client")
        if version != self.version:
            raise CiphertextError(f"{what} uses wire format {version}, this medhe reads {self.version}: use the "
                                  "same medhe version on both sides")
        if got_kind != kind:
            raise CiphertextError(f"expected {what} but got {self.kinds.get(got_kind, f'kind {got_kind}')}: send "
                                  "the right message")
        return view, header.unpack_from(view)

    def check_binding(self, kind: int, got: bytes, expected: bytes, made_for: str, fix: str) -> None:
        """The id a message carries (plan id, circuit or key fingerprint) must be the receiver's."""
        if bytes(got) != bytes(expected):
            raise CiphertextError(f"{self.what(kind)} was made for {made_for} (id {bytes(got).hex()[:12]}, expected "
                                  f"{bytes(expected).hex()[:12]}): {fix}")

    def check_size(self, kind: int, got: int, expected: int) -> None:
        """A payload must be exactly as long as its header says."""
        if got != expected:
            raise CiphertextError(f"{self.what(kind)} is {got} bytes long, not what its header, which says "
                                  f"{expected}, promises: it was truncated or padded in transit; resend it")

    def check_checksum(self, kind: int, ok: bool) -> None:
        """The message's CRC or digest matched (``ok``), or the bytes changed in transit."""
        if not ok:
            raise CiphertextError(f"{self.what(kind)} failed its checksum: the bytes were altered in transit; "
                                  "resend them")
