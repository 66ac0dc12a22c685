"""Self-describing model directories: safetensors weights + ``card.json``.

A card records everything needed to rebuild, preprocess, interpret and audit a model (architecture, preprocessing,
labels, metrics, activation ranges, the exact training command), so a directory is usable on its own — by the
compilers, the server and the client — and loading fails with a message naming what is missing or inconsistent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from medhe import atomic
from medhe.errors import ArtifactError
from medhe.models.layers import set_recording
from medhe.models.modelcard import warn_if_old
from medhe.models.zoo import build_model

FORMAT = "medhe-model/1"
WEIGHTS = "model.safetensors"
CLIENT_WEIGHTS = "client.safetensors"
CARD = "card.json"
REQUIRED_KEYS = ("format", "name", "arch", "arch_kwargs", "task", "labels", "preprocessing")
TASKS = ("binary-class", "multi-class", "multi-label", "ordinal-regression")
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"


@dataclass
class ModelArtifact:
    """A loaded model directory: the server network, the optional public client network, and the card."""

    model: torch.nn.Module
    card: dict[str, Any]
    path: Path | None = None
    client_model: torch.nn.Module | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def task(self) -> str:
        return str(self.card["task"])

    @property
    def labels(self) -> list[str]:
        return list(self.card["labels"])

    def preprocess(self):
        from medhe.data import Preprocess

        return Preprocess.from_dict(self.card["preprocessing"])


def pretrained_names() -> list[str]:
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CARD).is_file())


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A model directory from a path, or the name of a model shipped inside the package."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    shipped = PRETRAINED_DIR / str(name_or_dir)
    if (shipped / CARD).is_file():
        return shipped
    names = ", ".join(pretrained_names()) or "none installed"
    raise ArtifactError(f"no model {str(name_or_dir)!r}: give a model directory or one of the shipped models ({names})")


def _state_dict_bytes(module: torch.nn.Module) -> bytes:
    # safetensors refuses shared storage; clone so shared activations (one PolyAct at several sites) still save.
    tensors = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    return save(tensors)


def save_artifact(out_dir: str | Path, model: torch.nn.Module, card: dict[str, Any],
                  client_model: torch.nn.Module | None = None) -> Path:
    """Write weights and card atomically; the card is validated first so a broken artifact is never written."""
    card = {"format": FORMAT, **card}
    validate_card(card, where=str(out_dir))
    if client_model is not None and "client_stage" not in card:
        raise ArtifactError("a client model was given but the card has no 'client_stage' (arch, arch_kwargs)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out / WEIGHTS, _state_dict_bytes(model))
    if client_model is not None:
        atomic.write_bytes(out / CLIENT_WEIGHTS, _state_dict_bytes(client_model))
    atomic.write_json(out / CARD, card)
    return out


def validate_card(card: Any, where: str = "card.json") -> None:
    if not isinstance(card, dict):
        raise ArtifactError(f"{where}: card.json must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in card]
    if missing:
        raise ArtifactError(f"{where}: card.json lacks {', '.join(missing)}; re-export the model with medhe train")
    if card["format"] != FORMAT:
        raise ArtifactError(f"{where}: card format {card['format']!r} is not {FORMAT!r}; upgrade medhe or re-export")
    if card["task"] not in TASKS:
        raise ArtifactError(f"{where}: task {card['task']!r} is not one of {', '.join(TASKS)}")
    if not isinstance(card["arch_kwargs"], dict):
        raise ArtifactError(f"{where}: arch_kwargs must be an object")
    if not isinstance(card["labels"], list) or not card["labels"]:
        raise ArtifactError(f"{where}: labels must be a non-empty list of names")


def _load_weights(module: torch.nn.Module, file: Path, where: str) -> None:
    if not file.is_file():
        raise ArtifactError(f"{where}: {file.name} is missing; copy the whole model directory or retrain")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{where}: {file.name} is not a readable safetensors file ({exc}); retrain or re-copy it") from None
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ArtifactError(f"{where}: {file.name} does not match architecture in card.json ({first}); "
                            "the card and weights disagree") from None
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(
            f"{where}: {file.name} does not match architecture in card.json "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); the card and weights disagree")


def _build(arch: str, kwargs: dict[str, Any], where: str) -> torch.nn.Module:
    try:
        return build_model(arch, **kwargs)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc}") from None


def read_card(path: Path) -> dict[str, Any]:
    """The validated ``card.json`` of a model directory, without building any network."""
    where = str(path)
    try:
        card = json.loads((path / CARD).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{where}: card.json is missing; this is not a medhe model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}: card.json is not valid JSON ({exc}); restore it or retrain") from None
    validate_card(card, where)
    warn_if_old(card, where)  # a card from before v2 still loads; its version, license, ... read as "unknown"
    return card


def load_artifact(name_or_dir: str | Path) -> ModelArtifact:
    """Load and validate a model directory (or a shipped model by name)."""
    path = resolve_model_dir(name_or_dir)
    where = str(path)
    card = read_card(path)
    try:
        card["preprocessing"] = dict(card["preprocessing"])
    except (TypeError, ValueError):
        raise ArtifactError(f"{where}: preprocessing must be an object") from None
    model = _build(card["arch"], card["arch_kwargs"], where)
    _load_weights(model, path / WEIGHTS, where)
    model.eval()
    set_recording(model, False)  # the card's ranges are the training set's; inference must not widen them
    client_model = None
    if card.get("client_stage"):
        stage = card["client_stage"]
        client_model = _build(stage["arch"], stage.get("arch_kwargs", {}), where)
        _load_weights(client_model, path / CLIENT_WEIGHTS, where)
        client_model.eval()
    return ModelArtifact(model=model, card=card, path=path, client_model=client_model)
