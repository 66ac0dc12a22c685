"""Client side of the toy identity scheme: "encryption" frames the input, "decryption" reads the logits."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from identity_scheme import wire
from medhe.errors import PlanError
from medhe.he.scheme import ClientSession


class IdentityClient(ClientSession):
    scheme = "identity"

    def __init__(self, spec: dict[str, Any]):
        if not isinstance(spec, dict) or spec.get("scheme") != self.scheme:
            raise PlanError("this is not an identity-scheme spec")
        self.shape = tuple(int(s) for s in spec["input"]["shape"])
        self.outputs = int(spec["output"]["count"])
        self.session: bytes | None = None

    def keygen(self) -> None:
        self.session = os.urandom(16)

    def evaluation_keys(self) -> bytes:
        if self.session is None:
            raise PlanError("call keygen() first")
        return wire.MAGIC + bytes([wire.KEYS]) + self.session

    def encrypt(self, x: np.ndarray) -> bytes:
        x = np.asarray(x, dtype=np.float32)
        if x.shape != self.shape:
            raise PlanError(f"input of shape {x.shape}, this model takes {self.shape}")
        return wire.pack(wire.INPUT, x.reshape(-1))

    def decrypt(self, data: bytes) -> np.ndarray:
        return wire.unpack(data, wire.OUTPUT, self.outputs, "the result").astype(np.float64)
