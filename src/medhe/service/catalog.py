"""Which models a server offers: ``NAME|DIR[:SCHEME]`` specs resolved to artifacts, and the public description
a client needs to use one (everything but the private server weights).

The compiled, scheme-specific part (``ServerModel.spec()``) comes from the workers; this module only reads the
model directory, so the web process stays light and scheme-agnostic.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medhe.errors import ArtifactError
from medhe.he.scheme import encrypted_weight_scheme, has_hook, scheme_hook, schemes
from medhe.models.artifact import CLIENT_WEIGHTS, WEIGHTS, read_card, resolve_model_dir
from medhe.service import protocol

_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to compile one served model: picklable, so it can be sent to worker processes."""

    id: str
    source: str
    scheme: str
    options: tuple = ()  # (key, value) pairs passed to compile_model
    encrypted: bool = False  # source is an ENCDIR (medhe encrypt-model): loaded, never compiled from weights


@dataclass
class ServedModel:
    """One model as the web process sees it: its reference, card and optional public client-stage weights."""

    ref: ModelRef
    card: dict[str, Any]
    client_weights: bytes | None = None
    spec: dict[str, Any] = field(default_factory=dict)  # filled in from a worker once compiled
    limits: dict[str, int] | None = None  # upload limits this server applies to the model (filled in at start)
    wire: dict[str, str] | None = None  # wire-format facts a client needs (CKKS: the parameter fingerprint)

    @property
    def id(self) -> str:
        return self.ref.id

    @property
    def batch_capable(self) -> bool:
        """Whether batch mode may serve it: a model of a scheme with a batch mode (CKKS) compiled from its weights,
        without a client stage. (Its batch plan is compiled on first use and may still not fit; GET the batch spec
        says so.)"""
        return has_hook(self.ref.scheme, "compile_batch") and not self.ref.encrypted \
            and self.client_weights is None and not self.card.get("client_stage")

    def describe(self) -> dict[str, Any]:
        """The public listing entry: enough to preprocess, encrypt, decrypt and interpret without other files."""
        card = self.card
        stage = None
        if self.client_weights is not None:
            stage = {
                "arch": card["client_stage"]["arch"],
                "arch_kwargs": card["client_stage"].get("arch_kwargs", {}),
                "weights_url": protocol.client_stage_path(self.id),
                "weights_sha256": hashlib.sha256(self.client_weights).hexdigest(),
                "weights_bytes": len(self.client_weights),
            }
        return {
            "id": self.id,
            "name": card["name"],
            "protocol_version": protocol.PROTOCOL_VERSION,  # the revision of protocol v1 the SDK checks
            # model cards v2 (docs/model-cards.md): results name model@version; "unknown" for an older card
            "version": str(card.get("version") or "unknown"),
            "card": {k: card.get(k) or "unknown" for k in ("license", "code_revision", "created", "intended_use")},
            "scheme": self.ref.scheme,
            "task": card["task"],
            "labels": list(card["labels"]),
            "preprocessing": card["preprocessing"],
            "client_stage": stage,
            "metrics": card.get("metrics", {}),
            # public like the metrics: the client applies it to its decrypted logits (docs/calibration.md)
            **({"calibration": card["calibration"]} if card.get("calibration") is not None else {}),
            "dataset": card.get("dataset"),
            "arch": card["arch"],
            "spec": self.spec,
            **({"limits": self.limits} if self.limits is not None else {}),
            **({"wire": self.wire} if self.wire else {}),
            "endpoints": {
                "keys": protocol.keys_path(self.id),
                "infer": protocol.infer_path(self.id),
                **({"batch": protocol.batch_path(self.id), "batch_keys": protocol.batch_keys_path(self.id),
                    "batch_infer": protocol.batch_infer_path(self.id)} if self.batch_capable else {}),
            },
        }


def parse_model_arg(arg: str) -> tuple[str, str | None]:
    """``NAME|DIR[:SCHEME]`` -> (source, scheme or None); a colon not followed by a scheme name is part of a path."""
    source, sep, scheme = arg.rpartition(":")
    known = schemes()
    if sep and scheme.lower() in known:
        return source, scheme.lower()
    if sep and not Path(arg).exists() and "/" not in scheme and "\\" not in scheme:
        raise ArtifactError(f"unknown scheme {scheme!r} in --model {arg!r}: choose one of {', '.join(known)}")
    return arg, None


def default_scheme(card: dict[str, Any]) -> str:
    options = card.get("scheme_options") or {}
    scheme = options.get("default_scheme") if isinstance(options, dict) else None
    return str(scheme or "ckks")


def read_model_dir(source: str) -> tuple[Path, dict[str, Any], bytes | None]:
    """Card and public client-stage weights of a model directory, without building any network: the web
    process never needs the networks, and the workers load and check the weights when they compile."""
    path = resolve_model_dir(source)
    card = read_card(path)
    if not (path / WEIGHTS).is_file():
        raise ArtifactError(f"{path}: {WEIGHTS} is missing; copy the whole model directory or retrain")
    weights = None
    if card.get("client_stage"):
        try:
            weights = (path / CLIENT_WEIGHTS).read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: the card has a client stage but {CLIENT_WEIGHTS} is missing") from None
    return path, card, weights


def load_catalog(args: list[str], ckks_options: dict[str, Any] | None = None) -> list[ServedModel]:
    """Resolve ``--model`` arguments into served models with unique URL-safe ids; ``ckks_options`` (e.g.
    ``{"key_switching": "hybrid"}``, ``medhe serve --key-switching``) go to every CKKS model's compile.

    A model served under one scheme is addressed by its card name; the same name under several schemes becomes
    ``name-scheme`` for each, so one server can offer e.g. CKKS and Paillier variants side by side.
    """
    if not args:
        raise ArtifactError("no model to serve: pass --model NAME|DIR[:SCHEME] at least once")
    loaded = []
    for arg in args:
        source, scheme = parse_model_arg(arg)
        path, card, weights = read_model_dir(source)
        scheme = scheme or default_scheme(card)
        if scheme not in schemes():
            raise ArtifactError(f"{source}: card asks for unknown scheme {scheme!r}; choose one of "
                                f"{', '.join(schemes())}")
        loaded.append((_ID_RE.sub("-", str(card["name"])).strip("-") or "model", str(path), scheme, card, weights))
    names = Counter(name for name, *_ in loaded)
    seen: set[str] = set()
    served = []
    for name, path, scheme, card, weights in loaded:
        model_id = name if names[name] == 1 else f"{name}-{scheme}"
        if model_id in seen:
            raise ArtifactError(f"model {model_id!r} is given twice with the same scheme; serve it once")
        seen.add(model_id)
        options = tuple(sorted((ckks_options or {}).items())) if scheme == "ckks" else ()
        served.append(ServedModel(ModelRef(model_id, path, scheme, options), card, weights))
    return served


def load_encrypted_catalog(dirs: list[str], taken: list[ServedModel] = ()) -> list[ServedModel]:
    """``--encrypted-model ENCDIR`` arguments as served models: only the ENCDIR's public card is read here (the
    workers load its ciphertexts); ids must not clash with ``taken``."""
    scheme = encrypted_weight_scheme() if dirs else ""
    read_public_card = scheme_hook(scheme, "read_encrypted_card") if dirs else None

    seen = {m.id for m in taken}
    served = []
    for arg in dirs:
        path = Path(arg).expanduser()
        card = read_public_card(path)
        model_id = _ID_RE.sub("-", str(card["name"])).strip("-") or "model"
        if model_id in seen:
            model_id = f"{model_id}-encrypted"
        if model_id in seen:
            raise ArtifactError(f"encrypted model {model_id!r} is given twice; serve it once")
        seen.add(model_id)
        served.append(ServedModel(ModelRef(model_id, str(path), scheme, encrypted=True), card, None))
    return served
