"""What one served model's uploads may weigh, and what a loaded key set costs the worker that holds it.

Computed once per model in the workers (which have the compiled model and its HE library) from the public spec,
and sent to the web process as plain numbers. The web process then refuses a body from its ``Content-Length``
or as soon as it streams past what the model can possibly need, and accounts keys at the memory they occupy once
deserialized, not at their (much smaller, level-trimmed and seeded) size as sent.

Each scheme states its own rules (its package's ``upload_rules`` hook, ``medhe.he.scheme.upload_rules``: CKKS in
``medhe.he.ckks.limits``, Paillier and TFHE likewise); a scheme without one gets no model-derived bound, and the
server's configured fallbacks apply. Every figure is a function of the public spec alone, so the same key set is
always accounted the same.
"""

from __future__ import annotations

import math
from typing import Any

from medhe.he.scheme import upload_rules


def rules_for(model: Any) -> dict[str, Any] | None:
    """Upload bounds and held memory of a compiled ``ServerModel``; ``None`` when its scheme has none."""
    return upload_rules(model)


def describe(rules: dict[str, Any] | None, max_body: int | None, max_key_upload: int,
             fallback_body: int = 256 << 20) -> dict[str, int]:
    """The limits a client sees in the model listing (``limits``): what this server will accept."""
    keys = min(rules["key_bytes"], max_key_upload) if rules else max_key_upload
    body = rules["input_bytes"] if rules else None
    if max_body is not None:
        body = max_body if body is None else min(body, max_body)
    out = {"key_bytes": int(keys), "input_bytes": int(body if body is not None else fallback_body)}
    if rules:
        out["key_set_held_bytes"] = int(rules["held_bytes"])
    if rules and "max_key_bits" in rules:
        out["max_key_bits"] = int(rules["max_key_bits"])
    if rules and "min_key_bits" in rules:
        out["min_key_bits"] = int(rules["min_key_bits"])
    return out


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{math.ceil(n / 1024)} KiB"
