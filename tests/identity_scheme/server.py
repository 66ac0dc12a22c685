"""Server side of the toy identity scheme: the model's own forward pass on the "ciphertext" (which is the input)."""

from __future__ import annotations

from typing import Any

import numpy as np

from identity_scheme import wire
from medhe.errors import CiphertextError, PlanError
from medhe.he.scheme import ServerModel
from medhe.models.predict import predict_logits


class IdentityServerModel(ServerModel):
    scheme = "identity"

    def __init__(self, artifact: Any):
        pre = artifact.card.get("preprocessing") or {}
        if artifact.client_model is not None or "size" not in pre:
            raise PlanError("the identity scheme serves models without a client stage whose card names the "
                            "input size")
        self.model = artifact.model.eval()
        self.name = artifact.name
        self.task = artifact.task
        self.labels = list(artifact.labels)
        self.shape = (int(pre.get("channels", 1)), int(pre["size"]), int(pre["size"]))

    @property
    def input_count(self) -> int:
        return int(np.prod(self.shape))

    def spec(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "format": "medhe-identity-spec/1", "model": self.name, "task": self.task,
                "labels": self.labels, "input": {"shape": list(self.shape)}, "output": {"count": len(self.labels)},
                "params": {"library": "numpy", "backend": "plaintext", "security_bits": 0}}

    def load_keys(self, data: bytes) -> bytes:
        if not isinstance(data, (bytes, bytearray)) or len(data) != wire.KEY_BYTES or data[:5] != \
                wire.MAGIC + bytes([wire.KEYS]):
            raise CiphertextError("identity-scheme keys are its magic, kind 1 and a 16-byte session id")
        return bytes(data[5:])

    def infer(self, keys: Any, ciphertext: bytes) -> bytes:
        x = wire.unpack(ciphertext, wire.INPUT, self.input_count, "the input").reshape((1, *self.shape))
        return wire.pack(wire.OUTPUT, predict_logits(self.model, x)[0])


def compile(artifact: Any, **options: Any) -> IdentityServerModel:
    if options:
        raise PlanError(f"the identity scheme takes no options, got {sorted(options)}")
    return IdentityServerModel(artifact)


def upload_rules(model: IdentityServerModel) -> dict[str, Any]:
    """Exact sizes: the web process refuses any other body from its length alone."""
    return {"scheme": "identity", "key_bytes": wire.KEY_BYTES, "input_bytes": 5 + 4 * model.input_count,
            "held_bytes": 16}
