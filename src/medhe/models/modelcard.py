"""Model cards v2: version, license, intended use, limitations, training-data fingerprint, code revision, date.

A hospital must be able to tell, months later, which model produced a diagnosis, what it was trained on and what it
must not be used for. These fields are filled here (``complete_card``) by ``medhe train`` and the recipes, and
were added to the shipped cards by ``python -m medhe.models.shipped_cards``. Older user-trained cards without them
still load: the readers below show ``"unknown"`` for what is missing (docs/model-cards.md).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable

from medhe.errors import MedheError
from medhe.revision import UNKNOWN, code_revision

log = logging.getLogger(__name__)

V2_FIELDS = ("version", "license", "intended_use", "limitations", "training_data", "code_revision", "created")
#: the shipped weights' license: the project's own (pyproject.toml); the data's terms are in training_data.terms
SHIPPED_LICENSE = "Apache-2.0"
#: a card medhe writes for weights someone else trained: their owner decides the license
NEW_LICENSE = "unspecified"
INTENDED_USE = ("Research and demonstration of diagnosis under homomorphic encryption (medhe). Not a medical device: "
                "not validated for clinical use; do not use it to diagnose, treat or triage patients.")
COMMON_LIMITATIONS = (
    "not validated on external or prospective data: figures come from one retrospective public dataset split",
    "no subgroup analysis by sex, age, scanner or hospital beyond what 'audit' and 'metrics' report",
)
_warned: set[str] = set()


def missing_fields(card: dict[str, Any]) -> list[str]:
    return [k for k in V2_FIELDS if card.get(k) in (None, "", [], {})]


def summary(card: dict[str, Any]) -> dict[str, Any]:
    """The v2 fields of a card for listings and reports, ``"unknown"`` where an older card lacks one."""
    out = {k: card.get(k) if card.get(k) not in (None, "", [], {}) else UNKNOWN for k in V2_FIELDS}
    out["version"] = str(out["version"])
    return out


def warn_if_old(card: dict[str, Any], where: str) -> list[str]:
    """Log once per card that it predates v2 (it still loads; its missing fields read as "unknown")."""
    missing = missing_fields(card)
    if missing and where not in _warned:
        _warned.add(where)
        log.warning("%s: card.json has no %s (a card from before model cards v2); they read as 'unknown' - "
                    "retrain, or add them as docs/model-cards.md describes", where, ", ".join(missing))
    return missing


# -- training data ------------------------------------------------------------------------------------------------
def trained_on(card: dict[str, Any]) -> list[str]:
    """The splits the weights were fitted on: train, or train + val where the recipe refit on both (covid-cxr)."""
    training = card.get("training") or {}
    runs = [training, *(training.get("ensemble_of") or [])]
    return ["train", "val"] if any(r.get("fit_on") == "train+val" for r in runs if isinstance(r, dict)) else ["train"]


def data_entry(dataset: str, splits: Iterable[str], size: int | None = None, data_dir: str | os.PathLike | None = None,
               split_rule: str | None = None) -> dict[str, Any]:
    """One dataset's part of ``training_data``: name, source, terms, split sizes, and the SHA-256 of the images of
    ``splits`` (medhe.data.fingerprint). A dataset that cannot be read records ``"unknown"`` and why."""
    from medhe.data.fingerprint import split_fingerprint

    splits = list(splits)
    name = str(dataset).rstrip("/").rsplit("/", 1)[-1]
    entry = _header(name, splits, split_rule)
    try:
        fp = split_fingerprint(dataset, splits, size=size, data_dir=data_dir)
    except MedheError as exc:
        return {**entry, "sha256": UNKNOWN, "why_unknown": str(exc)}
    return {**entry, "sizes": fp["sizes"], "n": fp["n"], "hash_scheme": fp["scheme"], "sha256": fp["sha256"],
            **({"size": size} if size is not None and _is_medmnist(name) else {})}


def _header(name: str, splits: list[str], split_rule: str | None) -> dict[str, Any]:
    from medhe.data.provenance import provenance

    prov = provenance(name)
    entry: dict[str, Any] = {"dataset": name}
    if prov is not None:
        entry.update(source=prov.source, terms=prov.terms)
    entry["split"] = split_rule or ("MedMNIST's official split" if _is_medmnist(name)
                                    else "medhe deterministic 70/15/15, seed 0 (medhe.data.folder)")
    entry["trained_on"] = splits
    return entry


def loaded_entry(dataset: str, train: Any, sizes: dict[str, int], size: int | None = None,
                 note: str | None = None) -> dict[str, Any]:
    """``training_data`` from the training split as it was loaded (``medhe train --limit`` keeps a subset, which
    reloading by name would not reproduce)."""
    from medhe.data.fingerprint import fingerprint

    name = str(dataset).rstrip("/").rsplit("/", 1)[-1]
    entry = _header(name, ["train"], None)
    scheme, digest = fingerprint([train])
    entry.update(sizes=dict(sizes), n=len(train), hash_scheme=scheme, sha256=digest,
                 **({"size": size} if size is not None and _is_medmnist(name) else {}))
    if note:
        entry["note"] = note
    return entry


def _is_medmnist(name: str) -> bool:
    from medhe.data.medmnist import MEDMNIST

    return name in MEDMNIST


def card_training_data(card: dict[str, Any], data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``training_data`` for a card from its ``dataset`` entry and the splits its training record names."""
    ds = card.get("dataset") or {}
    name = ds.get("path") or ds.get("name")
    if not name:
        return {"dataset": UNKNOWN, "sha256": UNKNOWN, "why_unknown": "the card records no dataset"}
    size = ds.get("size") if _is_medmnist(str(ds.get("name"))) else None
    return data_entry(name, trained_on(card), size=size, data_dir=data_dir, split_rule=ds.get("split"))


def parts(training_data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every fingerprinted entry of a ``training_data`` block: the model's own (or its ``parts``) and those of its
    client stage, labelled for messages."""
    out: list[tuple[str, dict[str, Any]]] = []
    for label, block in (("model", training_data), ("client_stage", training_data.get("client_stage"))):
        if not isinstance(block, dict):
            continue
        if "parts" in block:
            out += [(f"{label}[{i}]", p) for i, p in enumerate(block["parts"])]
        elif "sha256" in block:
            out.append((label, block))
    return out


def verify(training_data: dict[str, Any], data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Recompute every fingerprint from the data at hand: one row per entry with ``match`` True/False (or None
    when the dataset is not here)."""
    rows = []
    for label, entry in parts(training_data):
        row = {"part": label, "dataset": entry.get("dataset"), "expected": entry.get("sha256")}
        again = data_entry(entry["dataset"], entry.get("trained_on") or ["train"], size=entry.get("size"),
                           data_dir=data_dir, split_rule=entry.get("split"))
        row["actual"] = again["sha256"]
        row["match"] = None if again["sha256"] == UNKNOWN else again["sha256"] == entry.get("sha256")
        if again.get("why_unknown"):
            row["why"] = again["why_unknown"]
        rows.append(row)
    return rows


# -- limitations --------------------------------------------------------------------------------------------------
def limitations(card: dict[str, Any], datasets: Iterable[str] = ()) -> list[str]:
    """Known limitations every card shares, the input resolution, and each training dataset's known biases."""
    from medhe.data.provenance import provenance

    out = list(COMMON_LIMITATIONS)
    size = (card.get("preprocessing") or {}).get("size")
    if size:
        out.append(f"input resized to {size}x{size} pixels before the network, below diagnostic resolution")
    for name in dict.fromkeys(datasets):
        prov = provenance(name)
        out += [f"{name}: {b}" for b in (prov.biases if prov else ())]
    return out


# -- filling new cards --------------------------------------------------------------------------------------------
def complete_card(card: dict[str, Any], *, training_data: dict[str, Any] | None = None,
                  data_dir: str | os.PathLike | None = None, version: str | None = None,
                  license: str | None = None) -> dict[str, Any]:
    """The card with every missing v2 field filled (fields the caller set are kept): version ``"1"`` unless given,
    license ``"unspecified"`` (the trainer owns new weights), the intended use, limitations from the data, the
    training-data fingerprint (computed from ``card["dataset"]`` unless given), ``git rev-parse HEAD`` now (or
    ``"unknown"``) as the training revision, and today's date."""
    out = dict(card)
    out.setdefault("version", str(version or "1"))
    out.setdefault("license", license or NEW_LICENSE)
    out.setdefault("intended_use", INTENDED_USE)
    if "training_data" not in out:
        out["training_data"] = training_data if training_data is not None else card_training_data(out, data_dir)
    if "limitations" not in out:
        names = [p.get("dataset") for label, p in parts(out["training_data"])
                 if not label.startswith("client_stage") and p.get("dataset") not in (None, UNKNOWN)]
        out["limitations"] = limitations(out, names)
    if "code_revision" not in out:
        out["code_revision"] = code_revision()
        out["code_revision_source"] = "training: git rev-parse HEAD when the card was written (uncommitted " \
                                      "changes not captured)" if out["code_revision"] != UNKNOWN else \
                                      "training: not run from a git checkout"
    out.setdefault("created", time.strftime("%Y-%m-%d"))
    return out
