"""TFHE upload rules (the ``upload_rules`` hook of ``medhe.he.scheme``): Concrete reports the uncompressed sizes of
the circuit's bootstrap and key-switching keys and of its input ciphertexts; uploads (compressed, seeded) are
bounded by those plus medhe's 34-byte frame and a margin, and a key set is accounted at the uncompressed key size
(an upper bound: pneumoniamnist-qfcnn's set grew a worker by 330 MiB after its first inference, 545 MiB
accounted)."""

from __future__ import annotations

from typing import Any

from medhe.he.uploads import MARGIN, SLACK

TFHE_HEADER = 34  # medhe.he.tfhe.wire: magic, version, kind, fingerprint, payload length, CRC-32


def upload_rules(model: Any) -> dict[str, Any] | None:
    """``None`` for a circuit that does not report its key sizes (the server's fallbacks apply)."""
    spec = model.spec()
    return tfhe_rules(spec) if "bootstrap_key_bytes" in spec.get("params", {}) else None


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
