"""Paillier (additively homomorphic, library phe) inference for a private linear head over public features.

The client runs the model's public feature extractor, encrypts the feature vector, and the server evaluates its
private linear layer W x + b on the ciphertexts in fixed point; only the client can decrypt the scores. See
docs/paillier.md for what each side learns, the scale and the error bound.

    server = compile(load_artifact("covid-cxr"))          # = compile_paillier
    client = Client(server.spec()); client.keygen()       # = PaillierClient

Same package shape as ckks and tfhe: ``SCHEME``, ``DEFAULT_MODEL``, lazily imported ``compile`` / ``Client``.
"""

from __future__ import annotations

from medhe.he.lazy import lazy_exports

SCHEME = "paillier"
DEFAULT_MODEL = "covid-cxr"

_LAZY = {
    "compile": ("medhe.he.paillier.server", "compile_paillier"),
    "compile_paillier": ("medhe.he.paillier.server", "compile_paillier"),
    "Client": ("medhe.he.paillier.client", "PaillierClient"),
    "PaillierClient": ("medhe.he.paillier.client", "PaillierClient"),
    "PaillierServerModel": ("medhe.he.paillier.server", "PaillierServerModel"),
    "PaillierKeys": ("medhe.he.paillier.server", "PaillierKeys"),
    "affine_map": ("medhe.he.paillier.server", "affine_map"),
    "DEFAULT_KEY_BITS": ("medhe.he.security", "PAILLIER_DEFAULT_KEY_BITS"),
    "MIN_KEY_BITS": ("medhe.he.security", "PAILLIER_MIN_KEY_BITS"),
    # the optional modes of medhe.he.scheme.HOOKS
    "upload_rules": ("medhe.he.paillier.limits", "upload_rules"),
    "run_benchmark": ("medhe.he.paillier.bench", "run_paillier_benchmark"),
}

__all__ = ["SCHEME", "DEFAULT_MODEL", *_LAZY]

__getattr__ = lazy_exports(__name__, _LAZY)
