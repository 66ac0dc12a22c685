"""Compile a QAT artifact's frozen integer program into a TFHE server model (the scheme's ``compile`` entry)."""

from __future__ import annotations

from typing import Any

from medhe.errors import PlanError
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
