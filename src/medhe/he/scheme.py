"""The contract every encryption scheme implements, so evaluation, the service and the CLI stay scheme-agnostic.

A ``ServerModel`` holds a compiled plan and the private weights and never sees a secret key; a ``ClientSession``
holds the secret key and never leaves the client. Everything between them is bytes.

A scheme is one package: ``SCHEME``, ``DEFAULT_MODEL``, ``compile`` and ``Client`` (required), plus optional hooks
that give it more modes (``HOOKS``: batch mode, encrypted-weight models, upload rules, benchmark, inspection).
The service and the CLI reach a scheme only through the functions here, so a scheme the service has never heard of
(``register_scheme``, e.g. a toy one in the tests) is served, load-tested and reported like the shipped three.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any

import numpy as np

from medhe.errors import PlanError

#: scheme name -> its package (an import path or a module); each package has SCHEME, DEFAULT_MODEL and lazily
#: imported ``compile`` / ``Client``
_REGISTRY: dict[str, str | ModuleType] = {
    "ckks": "medhe.he.ckks",
    "tfhe": "medhe.he.tfhe",
    "paillier": "medhe.he.paillier",
}

#: the shipped schemes (argparse choices, docs); ``schemes()`` also lists those registered at run time
SCHEMES = tuple(_REGISTRY)

#: ``name=package,name=package``: schemes registered at run time, read by every process (``medhe serve`` started
#: as a child, its spawned workers), so a registered scheme is known wherever its models are compiled
ENV = "MEDHE_SCHEMES"

#: optional package attributes -> the mode they give a scheme (named in the error when a scheme lacks one)
HOOKS = {
    "upload_rules": "upload rules",  # (ServerModel) -> limits dict for the web process, or None
    "compile_batch": "batch mode",  # (artifact, **options) -> batch server (spec, load_keys, infer_batch)
    "BatchClient": "batch mode",  # (batch spec) -> client with keygen, evaluation_keys, iter_encrypt, decrypt_one
    "evaluate_batch": "batch mode",  # medhe evaluate --batch
    "load_encrypted_model": "encrypted-weight models",  # (ENCDIR) -> ServerModel; weights only as ciphertexts
    "read_encrypted_card": "encrypted-weight models",  # (ENCDIR) -> its public card
    "load_keydir": "encrypted-weight models",  # (KEYDIR) -> the key holder's key set
    "KeyHolderClient": "encrypted-weight models",  # (spec, keys, where=) -> ClientSession of the key holder
    "make_keydir": "encrypted-weight models",  # medhe keygen
    "KEYDIR_SECRET_FILE": "encrypted-weight models",  # the secret key's file name in a KEYDIR
    "encrypt_model": "encrypted-weight models",  # medhe encrypt-model
    "evaluate_encrypted_model": "encrypted-weight models",  # medhe evaluate --encrypted-model
    "evaluate": "evaluation of its own",  # replaces the generic medhe evaluate loop (TFHE: simulate + execute)
    "layer_report": "per-layer debugging",  # medhe evaluate --debug-layers
    "run_benchmark": "benchmark",  # medhe bench --scheme, and format_benchmark for its summary lines
    "format_benchmark": "benchmark",
    "run_engine_measurement": "engine-only benchmark",  # medhe bench --engine-only
    "run_op_costs": "per-operation benchmark",  # medhe bench --ops
    "run_batch_benchmark": "batch mode",  # medhe bench --batch, with add_batch_comparison, format_batch_throughput
    "add_batch_comparison": "batch mode",
    "format_batch_throughput": "batch mode",
    "inspect_model": "plan inspection",  # medhe inspect: (artifact, **options) -> table, and render_inspection
    "render_inspection": "plan inspection",
}


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


def _registry() -> dict[str, str | ModuleType]:
    """The shipped schemes, those named in ``$MEDHE_SCHEMES``, then those registered in this process."""
    merged: dict[str, str | ModuleType] = dict(_REGISTRY)
    for item in os.environ.get(ENV, "").split(","):
        name, sep, package = item.strip().partition("=")
        if sep and name and package:
            merged.setdefault(name, package)
    return {**merged, **_RUNTIME}


_RUNTIME: dict[str, str | ModuleType] = {}


def schemes() -> tuple[str, ...]:
    """Every scheme this process can use: the shipped ones and those registered at run time."""
    return tuple(_registry())


def register_scheme(name: str, package: str | ModuleType) -> None:
    """Add scheme ``name`` implemented by ``package`` (an import path, or a module whose ``__name__`` is
    importable): the registry, the service and the CLI's functions treat it like the shipped schemes. Its import
    path is also named in ``$MEDHE_SCHEMES``, so processes started afterwards (``medhe serve``, its workers) know
    it too; they must be able to import it (``PYTHONPATH``)."""
    if not name or not name.replace("-", "").replace("_", "").isalnum() or name in _REGISTRY:
        raise PlanError(f"cannot register scheme {name!r}: give a new name of letters, digits, - and _")
    path = package if isinstance(package, str) else package.__name__
    _RUNTIME[name] = package
    entries = [e for e in os.environ.get(ENV, "").split(",") if e and e.partition("=")[0] != name]
    os.environ[ENV] = ",".join([*entries, f"{name}={path}"])


def unregister_scheme(name: str) -> None:
    """Undo ``register_scheme`` (the shipped schemes stay)."""
    _RUNTIME.pop(name, None)
    entries = [e for e in os.environ.get(ENV, "").split(",") if e and e.partition("=")[0] != name]
    if entries:
        os.environ[ENV] = ",".join(entries)
    else:
        os.environ.pop(ENV, None)


def scheme_package(scheme: str) -> ModuleType:
    """The package of ``scheme`` (``medhe.he.<scheme>``); ``PlanError`` naming the choices for unknown names."""
    registry = _registry()
    try:
        package = registry[scheme]
    except (KeyError, TypeError):
        raise PlanError(f"unknown scheme {scheme!r}: choose one of {', '.join(registry)}") from None
    if isinstance(package, ModuleType):
        return package
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name is None or not package.startswith(exc.name):
            raise  # the package itself imports something missing: its own error says what
        raise PlanError(f"scheme {scheme!r}: its package {package!r} cannot be imported; put the folder that "
                        f"holds it on PYTHONPATH (${ENV} = {os.environ.get(ENV, '')!r})") from None


def has_hook(scheme: str, name: str) -> bool:
    """Whether ``scheme``'s package offers the optional hook ``name`` (see ``HOOKS``), without importing the hook
    (the web process asks this of every model and stays free of the schemes' libraries)."""
    try:
        package = scheme_package(scheme)
    except PlanError:
        return False
    lazy = getattr(vars(package).get("__getattr__"), "exports", ())
    return name in vars(package) or name in lazy


def scheme_hook(scheme: str, name: str) -> Any:
    """The optional hook ``name`` of ``scheme``'s package; ``PlanError`` naming the scheme and the mode it lacks."""
    hook = _lookup(scheme_package(scheme), name)
    if hook is None:
        raise PlanError(f"scheme {scheme!r} has no {HOOKS.get(name, name)} (its package offers no {name!r})")
    return hook


def _lookup(package: ModuleType, name: str) -> Any:
    try:
        return getattr(package, name)
    except AttributeError:
        return None


def hook_schemes(name: str) -> tuple[str, ...]:
    """The schemes whose packages offer hook ``name``, in registry order (e.g. who serves encrypted weights)."""
    return tuple(s for s in schemes() if has_hook(s, name))


def encrypted_weight_scheme() -> str:
    """The scheme of encrypted-weight models (``medhe serve --encrypted-model``, ``Client(keys=KEYDIR)``): the
    first that loads them; ``PlanError`` when none does."""
    found = hook_schemes("load_encrypted_model")
    if not found:
        raise PlanError("no scheme serves encrypted-weight models")
    return found[0]


def default_model(scheme: str) -> str:
    """The shipped model a scheme runs when the user names none."""
    return scheme_package(scheme).DEFAULT_MODEL


def compile_model(artifact: Any, scheme: str, **options: Any) -> ServerModel:
    """Compile a loaded ``ModelArtifact`` for ``scheme`` (``medhe.he.<scheme>.compile``)."""
    return scheme_package(scheme).compile(artifact, **options)


def client_for(spec: dict[str, Any]) -> ClientSession:
    """A fresh client session for a server's public ``spec`` (the scheme is read from it)."""
    return scheme_package(str(spec.get("scheme"))).Client(spec)


# -- the optional modes, each through its hook -------------------------------------------------------------------
def compile_batch(artifact: Any, scheme: str, **options: Any) -> Any:
    """Batch mode's server for ``artifact`` (one image per slot): ``PlanError`` if ``scheme`` has no batch mode or
    the model does not fit it."""
    return scheme_hook(scheme, "compile_batch")(artifact, **options)


def batch_client_for(spec: dict[str, Any]) -> Any:
    """A fresh batch-mode client for a batch spec (the scheme is read from it)."""
    return scheme_hook(str(spec.get("scheme")), "BatchClient")(spec)


def load_encrypted_model(scheme: str, encdir: Any) -> ServerModel:
    """The ``ServerModel`` of an encrypted-weight model directory (its weights are ciphertexts)."""
    return scheme_hook(scheme, "load_encrypted_model")(encdir)


def key_holder_client(spec: dict[str, Any], keys: Any, where: str) -> ClientSession:
    """The key holder's session for an encrypted-weight model's ``spec`` (``keys``: its loaded KEYDIR)."""
    return scheme_hook(str(spec.get("scheme")), "KeyHolderClient")(spec, keys, where=where)


def upload_rules(model: Any) -> dict[str, Any] | None:
    """Upload bounds and held key memory of a compiled model, from its scheme's ``upload_rules`` hook; ``None``
    when the scheme declares none (the server's configured size limits apply)."""
    scheme = str(model.spec().get("scheme"))
    return scheme_hook(scheme, "upload_rules")(model) if has_hook(scheme, "upload_rules") else None
