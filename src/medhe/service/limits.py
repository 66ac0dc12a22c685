"""What one served model's uploads may weigh, and what a loaded key set costs the worker that holds it.

Computed once per model in the workers (which have the compiled model and its HE library) from the public spec,
and sent to the web process as plain numbers. The web process then refuses a body from its ``Content-Length``
or as soon as it streams past what the model can possibly need, and accounts keys at the memory they occupy once
deserialized, not at their (much smaller, level-trimmed and seeded) size as sent:

- CKKS: a key set is ``len(rotation_steps)`` Galois keys (+1 relinearization key); SEAL holds each as
  ``d = len(data primes)`` key-switching components of 2 polynomials over all ``d + 1`` primes, 8 bytes per
  coefficient, trimmed digits refilled with zeros; hybrid keys (key envelope 2) only the digits each key's plan
  level reads, over the ``L + k`` primes of Q*P. Uploads are bounded by the same keys whole and unseeded
  (every coefficient bit-packed to its prime's width), inputs by ``input.ciphertexts`` unseeded ciphertexts at
  the input level; plus framing and a margin.
- Paillier: one modulus of ``min_key_bits`` (the spec's, never below the 128-bit floor of 3072) to
  ``MAX_CLIENT_KEY_BITS`` bits; inputs are ``dim`` integers mod n^2.
- TFHE: Concrete reports the uncompressed sizes of the circuit's bootstrap and key-switching keys and of its
  input ciphertexts; uploads (compressed, seeded) are bounded by those plus medhe's 34-byte frame and a margin, and
  a key set is accounted at the uncompressed key size (an upper bound: pneumoniamnist-qfcnn's set grew a worker by
  330 MiB after its first inference, 545 MiB accounted).
- Other schemes: no model-derived bound; the server's configured fallbacks apply.

Every figure is a function of the public spec alone, so the same key set is always accounted the same.
"""

from __future__ import annotations

import math
from typing import Any

#: Largest Paillier modulus a client may register. A 16384-bit key makes each request ~100x the work of a
#: 3072-bit one (exponentiations are cubic in the size), so one client could starve the others.
MAX_CLIENT_KEY_BITS = 4096
MARGIN = 1.25  # on top of the computed sizes: skeleton/zlib variation and headers
SLACK = 64 << 10  # bytes on top of that, for tiny models whose framing dominates
_COMPONENT_OVERHEAD = 256  # SEAL headers and metadata per key component or ciphertext (compact skeleton, generous)


def _bits_bytes(bits: int) -> int:
    return (bits + 7) // 8


def ckks_rules(spec: dict[str, Any], fingerprint: bytes, key_fingerprint: bytes | None = None) -> dict[str, Any]:
    """``fingerprint``: the (client) context's frames; ``key_fingerprint``: hybrid plans' key context (4.12)."""
    params = spec["params"]
    n, primes = int(params["poly_degree"]), [int(b) for b in params["prime_bits"]]
    k = len(primes)  # key level: data primes + special prime
    data = k - 1
    nkeys = len(spec["rotation_steps"]) + (1 if spec.get("relinearization") else 0)
    key_whole = data * (2 * _bits_bytes(n * sum(primes)) + _COMPONENT_OVERHEAD)
    level = int(spec["input"]["level"])
    ct_whole = 2 * _bits_bytes(n * sum(primes[: level + 1])) + _COMPONENT_OVERHEAD
    cts = int(spec["input"]["ciphertexts"])
    header = 24 + 4 * max(2, cts) + 32 * 4
    rules = {
        "scheme": "ckks",
        "key_bytes": int(header + nkeys * key_whole * MARGIN + SLACK),
        "input_bytes": int(header + cts * ct_whole * MARGIN + SLACK),
        "held_bytes": ckks_spec_held_bytes(spec),
        "plan_id": str(spec["plan_id"]),
        "fingerprint": fingerprint.hex(),
        "input_ciphertexts": cts,
        "galois_part_bytes": int(len(spec["rotation_steps"]) * key_whole * MARGIN + SLACK),
        "relin_part_bytes": int(key_whole * MARGIN + SLACK) if spec.get("relinearization") else 0,
        "input_part_bytes": int(ct_whole * MARGIN + SLACK),
    }
    if int(params.get("alpha", 0) or 0) > 0:
        rules.update(_hybrid_key_rules(spec, nkeys, key_fingerprint))
    return rules


def _hybrid_key_rules(spec: dict[str, Any], nkeys: int, key_fingerprint: bytes | None) -> dict[str, Any]:
    """Key envelope 2 (docs/protocol.md 4.12): an index part, then per key at most ``dnum`` digit frames, each a
    seeded ciphertext of the key context (every prime of Q*P and one unused prime of at most 60 bits)."""
    if key_fingerprint is None:
        raise ValueError("a hybrid plan's upload rules need its key context's fingerprint")
    params = spec["params"]
    n, primes = int(params["poly_degree"]), [int(b) for b in params["prime_bits"]]
    levels = len(primes) - int(params["specials"])
    dnum = math.ceil(levels / int(params["alpha"]))
    digit_whole = 2 * _bits_bytes(n * (sum(primes) + 60)) + _COMPONENT_OVERHEAD
    parts = 1 + nkeys * dnum
    index = 4 + 6 * nkeys
    return {
        "key_envelope": 2,
        "key_fingerprint": key_fingerprint.hex(),
        "key_max_parts": parts,
        "index_part_bytes": index,
        "digit_part_bytes": int(digit_whole * MARGIN + SLACK),
        "key_bytes": int(24 + 4 * parts + index + nkeys * dnum * digit_whole * MARGIN + SLACK),
    }


def ckks_spec_held_bytes(spec: dict[str, Any]) -> int:
    """What one key set of this CKKS spec holds once loaded. SEAL's format: ``ckks_key_held_bytes``. Hybrid keys
    (key envelope 2, docs/protocol.md 4.12): the native runtime keeps, per key, the digits its plan level reads
    (``ceil((level + 1) / alpha)``; the server drops any extra digits a client sends), each 2 polynomials over all
    ``L + k`` primes of Q*P, 8 bytes a coefficient -- a fraction of the SEAL-format figure."""
    params = spec["params"]
    nkeys = len(spec["rotation_steps"]) + (1 if spec.get("relinearization") else 0)
    alpha = int(params.get("alpha", 0) or 0)
    if alpha <= 0:
        return ckks_key_held_bytes(params, nkeys)
    n, limbs = int(params["poly_degree"]), len(params["prime_bits"])
    levels = spec["key_levels"]
    top = int(spec["input"]["level"])
    used = [int(levels["galois"].get(str(s), top)) for s in spec["rotation_steps"]]
    if spec.get("relinearization"):
        used.append(int(levels["relin"]))
    return sum(math.ceil((lv + 1) / alpha) for lv in used) * 2 * limbs * n * 8


def ckks_key_held_bytes(params: dict[str, Any], nkeys: int = 1) -> int:
    """What ``nkeys`` CKKS key-switching keys hold once SEAL has loaded them: every key refilled to full size,
    ``d = len(data primes)`` components of 2 polynomials over all ``d + 1`` primes, 8 bytes a coefficient."""
    n, k = int(params["poly_degree"]), len(params["prime_bits"])
    return nkeys * (k - 1) * 2 * k * n * 8


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


TFHE_HEADER = 34  # medhe.he.tfhe.wire: magic, version, kind, fingerprint, payload length, CRC-32


def tfhe_rules(spec: dict[str, Any]) -> dict[str, Any]:
    params = spec["params"]
    keys = int(params["bootstrap_key_bytes"]) + int(params["keyswitch_key_bytes"])
    inputs = int(params["input_ciphertext_bytes"])
    return {
        "scheme": "tfhe",
        "key_bytes": int(TFHE_HEADER + keys * MARGIN + SLACK),
        "input_bytes": int(TFHE_HEADER + inputs * MARGIN + SLACK),
        "held_bytes": keys,
        "fingerprint": str(spec["fingerprint"]),
    }


def rules_for(model: Any) -> dict[str, Any] | None:
    """Upload bounds and held memory of a compiled ``ServerModel``; ``None`` when its scheme has none."""
    spec = model.spec()
    scheme = spec.get("scheme")
    if scheme == "ckks":
        from medhe.he.ckks.backends.seal import seal_context
        from medhe.he.ckks.compiler.params import CKKSParams
        from medhe.he.ckks.wire.serialize import params_fingerprint

        # from the parameters, not the model's backend: the frames are SEAL's whatever backend evaluates them
        params = CKKSParams.from_dict(spec["params"])
        key_fingerprint = None
        if params.hybrid:
            from medhe.he.ckks.hybrid import sealctx

            key_fingerprint = params_fingerprint(sealctx.key_context(params.layout()))
        return ckks_rules(spec, params_fingerprint(seal_context(params)), key_fingerprint)
    if scheme == "paillier":
        return paillier_rules(spec, int(getattr(model, "pool_size", 0)))
    if scheme == "tfhe" and "bootstrap_key_bytes" in spec.get("params", {}):
        return tfhe_rules(spec)
    return None


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
