"""Self-describing model directories: safetensors weights + ``card.json``.

A card records everything needed to rebuild, preprocess, interpret and audit a model (architecture, preprocessing,
labels, metrics, activation ranges, the exact training command), so a directory is usable on its own — by the
compilers, the server and the client — and loading fails with a message naming what is missing or inconsistent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from medhe import atomic
from medhe.atomic_folder import note, writing_folder
from medhe.errors import ArtifactError
from medhe.models.layers import set_recording
from medhe.models.modelcard import summary, warn_if_old
from medhe.models.zoo import build_model
from medhe.revision import code_revision

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


MODEL_FILES = (WEIGHTS, CLIENT_WEIGHTS, CARD)


def check_model_target(out_dir: str | Path, overwrite: bool, force_hint: str = "pass --force") -> None:
    """Refuse (one line) to write a model into ``out_dir`` when that would lose something: a trained model there
    (unless ``overwrite``) or any file that is not part of a medhe model (always). Cheap: callers run it before
    training, and :func:`save_artifact` again just before the folder is replaced."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} is a file, not a model folder: choose another --out")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in MODEL_FILES and not _is_write_leftover(n)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ArtifactError(f"{out} holds files that are not part of a medhe model ({shown}); writing a model "
                            "there would replace them: move them away or choose another --out")
    if CARD in names and not overwrite:
        try:
            name = json.loads((out / CARD).read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        what = f"model {name!r}" if isinstance(name, str) else "a trained model"
        raise ArtifactError(f"{out} already holds {what}: {force_hint} to replace it (the old one stays intact "
                            "until the new one is complete), or choose another --out")


def _is_write_leftover(name: str) -> bool:
    """Temp files an older medhe left when killed mid-write (``.model.safetensors.abc123.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and name[1:].split(".tmp")[0].rsplit(".", 1)[0] in MODEL_FILES


def save_artifact(out_dir: str | Path, model: torch.nn.Module, card: dict[str, Any],
                  client_model: torch.nn.Module | None = None, *, overwrite: bool = True,
                  command: str | None = None) -> Path:
    """Write weights and card as one folder: the card is validated first so a broken artifact is never written,
    and every file goes to a temp folder beside ``out_dir`` that is renamed over it as a whole
    (``medhe.atomic_folder``), so an existing model there stays intact until the new one is complete and weights
    never end up beside another model's card. ``overwrite=False`` refuses to replace a trained model."""
    card = {"format": FORMAT, **card}
    validate_card(card, where=str(out_dir))
    if client_model is not None and "client_stage" not in card:
        raise ArtifactError("a client model was given but the card has no 'client_stage' (arch, arch_kwargs)")
    out = Path(out_dir).expanduser()
    weights = _state_dict_bytes(model)
    client = _state_dict_bytes(client_model) if client_model is not None else None
    check_model_target(out, overwrite)
    incomplete = out.is_dir() and any(out.iterdir()) and not (out / CARD).is_file()
    with writing_folder(out, command, replace=True) as tmp:
        atomic.write_bytes(tmp / WEIGHTS, weights)
        if client is not None:
            atomic.write_bytes(tmp / CLIENT_WEIGHTS, client)
        atomic.write_json(tmp / CARD, card)
    if incomplete:
        note(f"{out} held an incomplete model (no card.json: an interrupted write); replaced it")
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


# -- provenance of a result -----------------------------------------------------------------------------------------
def provenance(model: str | os.PathLike) -> dict[str, Any]:
    """What a result must name to be traced later: the model id and card version, the card's code revision, the
    revision running now (``git rev-parse HEAD`` or ``"unknown"``), medhe's version and the weights' SHA-256."""
    import hashlib

    from medhe import __version__

    path = resolve_model_dir(model)
    card = read_card(path)
    fields = summary(card)
    weights = {f: hashlib.sha256((path / f).read_bytes()).hexdigest()
               for f in (WEIGHTS, CLIENT_WEIGHTS) if (path / f).is_file()}
    return {"model": str(card["name"]), "model_version": fields["version"],
            "model_code_revision": fields["code_revision"], "code_revision": code_revision(),
            "medhe_version": __version__, "weights_sha256": weights}
