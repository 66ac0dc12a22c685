"""What every scheme's upload rules share: the margin on top of a computed size, so that the web process can refuse
a body that cannot be a message for the model (``medhe.service.limits``) without ever refusing a valid one."""

from __future__ import annotations

MARGIN = 1.25  # on top of the computed sizes: skeleton/zlib variation and headers
SLACK = 64 << 10  # bytes on top of that, for tiny models whose framing dominates


def bits_bytes(bits: int) -> int:
    return (bits + 7) // 8
