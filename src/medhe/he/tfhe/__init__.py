"""TFHE backend (P2): quantization-aware FCNNs compiled to Concrete circuits; simulate or execute encrypted.

    server = compile_tfhe(load_artifact("pneumoniamnist-qfcnn"), fhe="execute")
    client = TFHEClient(server.spec()); client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    logits = client.decrypt(server.infer(keys, client.encrypt(x)))
"""

from __future__ import annotations

from typing import Any

from medhe.errors import PlanError
from medhe.he.tfhe.client import TFHEClient
from medhe.he.tfhe.server import MODES, TFHEServerModel
from medhe.models.quant import IntegerFCNN, QFCNN


def integer_model(artifact: Any) -> IntegerFCNN:
    """The frozen integer program of an artifact's QAT network (``PlanError`` for any other network)."""
    model = getattr(artifact, "model", artifact)
    if not isinstance(model, QFCNN):
        name = getattr(artifact, "name", type(model).__name__)
        raise PlanError(f"model {name!r} is not a quantization-aware 'qfcnn' network, which TFHE needs; train one "
                        "with medhe train --arch qfcnn --quant-bits N or pick a *-qfcnn model")
    return model.export_integer()


def compile_tfhe(artifact: Any, fhe: str = "execute", **opts: Any) -> TFHEServerModel:
    """Compile a loaded QAT artifact. Options: ``exactness`` ("approximate" | "exact" rounding), ``p_error``,
    and other ``concrete.fhe.Configuration`` fields."""
    if fhe not in MODES:
        raise PlanError(f"--fhe {fhe!r} is not one of {', '.join(MODES)}")
    card = dict(getattr(artifact, "card", {}) or {})
    return TFHEServerModel(integer_model(artifact), card, mode=fhe, **opts)


def simulate(server: TFHEServerModel, images: Any) -> Any:
    """Concrete simulation over preprocessed float images (N, C, H, W): dequantized logits (N, outputs)."""
    integer = server.integer
    return integer.dequantize(server.simulate(integer.quantize_input(images)))


def __getattr__(name: str) -> Any:  # evaluation and benchmarks pull in data loading: import them on demand
    if name == "evaluate_tfhe":
        from medhe.he.tfhe.evaluate import evaluate_tfhe
        return evaluate_tfhe
    if name == "run_tfhe_benchmark":
        from medhe.he.tfhe.bench import run_tfhe_benchmark
        return run_tfhe_benchmark
    raise AttributeError(name)


__all__ = ["TFHEClient", "TFHEServerModel", "compile_tfhe", "evaluate_tfhe", "integer_model", "run_tfhe_benchmark",
           "simulate"]
