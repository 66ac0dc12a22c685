"""The contract every encryption scheme implements, so evaluation, the service and the CLI stay scheme-agnostic.

A ``ServerModel`` holds a compiled plan and the private weights and never sees a secret key; a ``ClientSession``
holds the secret key and never leaves the client. Everything between them is bytes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any

import numpy as np

from medhe.errors import PlanError

#: scheme name -> its package; each package has SCHEME, DEFAULT_MODEL and lazily imported ``compile`` / ``Client``
_REGISTRY = {
    "ckks": "medhe.he.ckks",
    "tfhe": "medhe.he.tfhe",
    "paillier": "medhe.he.paillier",
}

SCHEMES = tuple(_REGISTRY)


class ServerModel(ABC):
    """Server side of one compiled model: evaluates ciphertexts with the client's public evaluation keys."""

    scheme: str

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Public, JSON-able description the client needs (scheme, parameters, input layout, labels, task)."""

    @abstractmethod
    def load_keys(self, data: bytes) -> Any:
        """Deserialize and validate a client's evaluation keys; raise ``CiphertextError`` when they do not fit."""

    @abstractmethod
    def infer(self, keys: Any, ciphertext: bytes) -> bytes:
        """Run the private network on an encrypted input; raise ``CiphertextError`` on malformed input."""

    def report_params(self) -> dict[str, Any]:
        """Facts about how this server runs, for reports (merged into their ``params``); not part of the spec."""
        return {}


class ClientSession(ABC):
    """Client side: owns the secret key, encrypts inputs, decrypts results."""

    scheme: str

    @abstractmethod
    def keygen(self) -> None: ...

    @abstractmethod
    def evaluation_keys(self) -> bytes:
        """Public evaluation material for the server. Never contains the secret key."""

    @abstractmethod
    def encrypt(self, x: np.ndarray) -> bytes: ...

    @abstractmethod
    def decrypt(self, data: bytes) -> np.ndarray: ...


def scheme_package(scheme: str) -> ModuleType:
    """The package of ``scheme`` (``medhe.he.<scheme>``); ``PlanError`` naming the choices for unknown names."""
    try:
        return importlib.import_module(_REGISTRY[scheme])
    except KeyError:
        raise PlanError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}") from None


def default_model(scheme: str) -> str:
    """The shipped model a scheme runs when the user names none."""
    return scheme_package(scheme).DEFAULT_MODEL


def compile_model(artifact: Any, scheme: str, **options: Any) -> ServerModel:
    """Compile a loaded ``ModelArtifact`` for ``scheme`` (``medhe.he.<scheme>.compile``)."""
    return scheme_package(scheme).compile(artifact, **options)


def client_for(spec: dict[str, Any]) -> ClientSession:
    """A fresh client session for a server's public ``spec`` (the scheme is read from it)."""
    return scheme_package(str(spec.get("scheme"))).Client(spec)
