"""Paillier upload rules (the ``upload_rules`` hook of ``medhe.he.scheme``): one modulus of ``min_key_bits`` (the
spec's, never below the 128-bit floor of 3072) to ``MAX_CLIENT_KEY_BITS`` bits; inputs are ``dim`` integers mod
n^2; a key set holds the key, its precomputations and the re-randomisation pool."""

from __future__ import annotations

from typing import Any

from medhe.he.uploads import bits_bytes as _bits_bytes

#: Largest Paillier modulus a client may register. A 16384-bit key makes each request ~100x the work of a
#: 3072-bit one (exponentiations are cubic in the size), so one client could starve the others.
MAX_CLIENT_KEY_BITS = 4096


def upload_rules(model: Any) -> dict[str, Any]:
    return paillier_rules(model.spec(), int(getattr(model, "pool_size", 0)))


def paillier_rules(spec: dict[str, Any], pool_size: int) -> dict[str, Any]:
    dim = int(spec["input"]["dim"])
    key_width = _bits_bytes(MAX_CLIENT_KEY_BITS)
    ct_width = _bits_bytes(2 * MAX_CLIENT_KEY_BITS)
    return {
        "scheme": "paillier",
        # room for keys up to 4x the limit, so that those get the message naming the key size limit from the
        # header check (anything larger is refused by size alone)
        "key_bytes": 36 + 4 * key_width + 16,
        "input_bytes": 36 + dim * ct_width + 16,
        # the key, its precomputations and the re-randomisation pool (one n^2 residue per pooled factor)
        "held_bytes": (pool_size + 8) * ct_width + (64 << 10),
        "max_key_bits": MAX_CLIENT_KEY_BITS,
        "min_key_bits": paillier_min_key_bits(spec),
        "dim": dim,
    }


def paillier_min_key_bits(spec: dict[str, Any]) -> int:
    """The smallest modulus this model's key registration accepts: the spec's ``min_key_bits``, never below medhe's
    128-bit floor (a spec from before issue 32 names none, or 2048; the worker refuses those keys anyway)."""
    from medhe.he.security import PAILLIER_MIN_KEY_BITS

    declared = spec.get("params", {}).get("min_key_bits")
    try:
        declared = int(declared) if declared is not None and not isinstance(declared, bool) else 0
    except (TypeError, ValueError):
        declared = 0
    return max(PAILLIER_MIN_KEY_BITS, declared)
