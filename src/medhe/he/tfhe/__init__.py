"""TFHE backend (P2): quantization-aware FCNNs compiled to Concrete circuits; simulate or execute encrypted.

    server = compile(load_artifact("pneumoniamnist-qfcnn"), fhe="execute")   # = compile_tfhe
    client = Client(server.spec()); client.keygen()                          # = TFHEClient
    keys = server.load_keys(client.evaluation_keys())
    logits = client.decrypt(server.infer(keys, client.encrypt(x)))

Every scheme package (ckks, tfhe, paillier) has this shape: ``SCHEME``, ``DEFAULT_MODEL``, and lazily imported
``compile`` / ``Client`` entries that ``medhe.he.scheme`` reads, so importing the package stays cheap.
"""

from __future__ import annotations

from medhe.he.lazy import lazy_exports

SCHEME = "tfhe"
DEFAULT_MODEL = "pneumoniamnist-qfcnn"

_LAZY = {
    "compile": ("medhe.he.tfhe.compiler", "compile_tfhe"),
    "compile_tfhe": ("medhe.he.tfhe.compiler", "compile_tfhe"),
    "integer_model": ("medhe.he.tfhe.compiler", "integer_model"),
    "simulate": ("medhe.he.tfhe.compiler", "simulate"),
    "Client": ("medhe.he.tfhe.client", "TFHEClient"),
    "TFHEClient": ("medhe.he.tfhe.client", "TFHEClient"),
    "TFHEServerModel": ("medhe.he.tfhe.server", "TFHEServerModel"),
    "evaluate_tfhe": ("medhe.he.tfhe.evaluate", "evaluate_tfhe"),
    "run_tfhe_benchmark": ("medhe.he.tfhe.bench", "run_tfhe_benchmark"),
    # the optional modes of medhe.he.scheme.HOOKS
    "upload_rules": ("medhe.he.tfhe.limits", "upload_rules"),
    "evaluate": ("medhe.he.tfhe.evaluate", "evaluate_report"),
    "run_benchmark": ("medhe.he.tfhe.bench", "run_tfhe_benchmark"),
}

__all__ = ["SCHEME", "DEFAULT_MODEL", *_LAZY]

__getattr__ = lazy_exports(__name__, _LAZY)
