"""CKKS upload rules (the ``upload_rules`` hook of ``medhe.he.scheme``): what one model's uploads may weigh and
what a loaded key set holds, from the public spec alone.

A key set is ``len(rotation_steps)`` Galois keys (+1 relinearization key); SEAL holds each as ``d = len(data
primes)`` key-switching components of 2 polynomials over all ``d + 1`` primes, 8 bytes per coefficient, trimmed
digits refilled with zeros; hybrid keys (key envelope 2) only the digits each key's plan level reads, over the
``L + k`` primes of Q*P. Uploads are bounded by the same keys whole and unseeded (every coefficient bit-packed to its
prime's width), inputs by ``input.ciphertexts`` unseeded ciphertexts at the input level; plus framing and a margin.
"""

from __future__ import annotations

import math
from typing import Any

from medhe.he.uploads import MARGIN, SLACK, bits_bytes as _bits_bytes

_COMPONENT_OVERHEAD = 256  # SEAL headers and metadata per key component or ciphertext (compact skeleton, generous)


def upload_rules(model: Any) -> dict[str, Any]:
    """The rules of a compiled CKKS model (single-image or batch): the frames' fingerprints come from the
    parameters, not the model's backend, since the frames are SEAL's whatever backend evaluates them."""
    from medhe.he.ckks.backends.seal import seal_context
    from medhe.he.ckks.compiler.params import CKKSParams
    from medhe.he.ckks.wire.serialize import params_fingerprint

    spec = model.spec()
    params = CKKSParams.from_dict(spec["params"])
    key_fingerprint = None
    if params.hybrid:
        from medhe.he.ckks.hybrid import sealctx

        key_fingerprint = params_fingerprint(sealctx.key_context(params.layout()))
    return ckks_rules(spec, params_fingerprint(seal_context(params)), key_fingerprint)


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
