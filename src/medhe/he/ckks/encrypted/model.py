"""The encrypted model (ENCDIR): made by the key holder, served by a compute server that never sees a weight.

``spec.json``    the public spec (parameters, input layout, rotations, key levels, the key id it is bound to);
``program.json`` the instruction stream with the level and scale of every weight ciphertext (``program``);
``weights.bin``  one seeded SEAL ciphertext per weight vector, bias, BatchNorm shift and activation constant,
                 each encrypted by the key holder at the level where the program uses it;
``card.json``    the public part of the model card (name, task, labels, preprocessing, metrics).

The server (:class:`EncryptedServerModel`) evaluates every linear layer as ciphertext x ciphertext products and
accepts only the evaluation keys of the key set the weights were encrypted under.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medhe import atomic
from medhe.atomic_folder import clear_interrupted, note, writing_folder
from medhe.errors import ArtifactError, CiphertextError, MedheError
from medhe.he.ckks.wire import envelope
from medhe.he.ckks.encrypted import program as program_mod
from medhe.he.ckks.encrypted.keys import KeyDir, key_id_of
from medhe.he.ckks.encrypted.spec import WeightCiphertexts, check_plan_id, encrypted_spec
from medhe.he.ckks.compiler.program import Plan
from medhe.he.ckks.server import CKKSKeys, CKKSServerModel

SPEC_FILE, PROGRAM_FILE, WEIGHTS_FILE, CARD_FILE = "spec.json", "program.json", "weights.bin", "card.json"
PUBLIC_CARD_KEYS = ("format", "name", "arch", "task", "labels", "dataset", "preprocessing", "metrics")
_MAGIC = b"MHCKWTS1"
_HEAD = struct.Struct("<8sI")
_LEN = struct.Struct("<I")


def compile_for_encryption(artifact: Any, **options: Any) -> Plan:
    """The model's CKKS plan exactly as ``compile_ckks`` makes it (card options apply), without encoding it."""
    from medhe.he.ckks.compiler.driver import compile_plan
    from medhe.he.ckks.server import input_shape_of

    card = artifact.card
    merged = {**((card.get("scheme_options") or {}).get("ckks") or {}), **options}
    return compile_plan(artifact.model, input_shape_of(artifact), card.get("activation_ranges"), **merged)


def spec_for(plan: Plan, card: dict[str, Any]) -> dict[str, Any]:
    return encrypted_spec(plan, card.get("task", "multi-class"), list(card.get("labels") or []),
                          card.get("name", "model"))


def encrypt_weights(plan: Plan, keys: KeyDir, progress: bool = True) -> bytes:
    """Every plaintext of ``plan`` encoded at its level and scale and encrypted with the key holder's secret key
    (SEAL, symmetric, straight to the compact seeded form); returns ``weights.bin``."""
    be = keys.backend()
    parts = []
    for p in tqdm(plan.plains, desc="encrypting weights", unit="ct", disable=not progress):
        parts.append(be.encrypt_bytes(be.encode(p.values, p.level, p.scale)))
    return _HEAD.pack(_MAGIC, len(parts)) + b"".join(_LEN.pack(len(x)) + x for x in parts)


def write_encrypted_model(plan: Plan, card: dict[str, Any], keys: KeyDir, out: str | os.PathLike,
                          progress: bool = True) -> dict[str, Any]:
    """Encrypt ``plan``'s weights under ``keys`` into a new ENCDIR; returns its spec."""
    spec = spec_for(plan, card)
    if spec["encrypted_model"]["base_plan_id"] != keys.spec["encrypted_model"]["base_plan_id"]:
        raise MedheError(f"the keys in {keys.path} were made for another model or compile options "
                         f"(model {keys.spec.get('model')!r}): run medhe keygen --model {card.get('name')} first")
    root = prepare_encdir(out)
    blob = encrypt_weights(plan, keys, progress)
    doc = program_mod.program_dict(plan)
    doc["weights_file"] = {"name": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                           "count": len(plan.plains)}
    public_spec = keys.spec
    with writing_folder(root, "medhe encrypt-model") as tmp:  # whole folder or nothing (medhe.atomic_folder)
        atomic.write_bytes(tmp / WEIGHTS_FILE, blob)
        atomic.write_json(tmp / PROGRAM_FILE, doc)
        atomic.write_json(tmp / SPEC_FILE, public_spec)
        atomic.write_json(tmp / CARD_FILE, {k: card[k] for k in PUBLIC_CARD_KEYS if k in card})
    return public_spec


def prepare_encdir(out: str | os.PathLike) -> Path:
    """Check an ENCDIR-to-be before encrypting: leftovers of interrupted runs removed (one line each), anything
    else in the way refused (one line)."""
    root = Path(out).expanduser()
    clear_interrupted(root)
    _clear_interrupted_encdir(root)
    return root


def _clear_interrupted_encdir(root: Path) -> None:
    """An older medhe killed during encrypt-model left a half ENCDIR (no card, written last): removed with one
    line, since no server could load it. A complete one or other files are refused, as before."""
    if not root.is_dir():
        if root.exists():
            raise MedheError(f"{root} is a file, not a folder: choose a new --out folder for the encrypted model")
        return
    names = sorted(p.name for p in root.iterdir())
    if not names:
        return
    files = (WEIGHTS_FILE, PROGRAM_FILE, SPEC_FILE, CARD_FILE)
    if CARD_FILE not in names and all(n in files or (n.startswith(".") and n.endswith(".tmp") and
                                                     n[1:-4].rsplit(".", 1)[0] in files) for n in names):
        for name in names:
            (root / name).unlink()
        note(f"{root} held an interrupted medhe encrypt-model (no {CARD_FILE}): removed it")
        return
    raise MedheError(f"{root} exists and is not empty: choose a new --out folder for the encrypted model")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: this is not an ENCDIR made by medhe encrypt-model") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path} is not valid JSON: the encrypted model is corrupted; encrypt it again") from None


def read_public_card(encdir: str | os.PathLike) -> dict[str, Any]:
    card = _read_json(Path(encdir) / CARD_FILE)
    if not isinstance(card, dict) or not all(k in card for k in ("name", "task", "labels", "preprocessing")):
        raise ArtifactError(f"{Path(encdir) / CARD_FILE} lacks name/task/labels/preprocessing; encrypt the model again")
    return card


def _split_weights(blob: bytes, where: Path) -> list[bytes]:
    if len(blob) < _HEAD.size or blob[:8] != _MAGIC:
        raise ArtifactError(f"{where} is not a medhe weight-ciphertext file; encrypt the model again")
    (_, count), pos, parts = _HEAD.unpack_from(blob), _HEAD.size, []
    for _ in range(count):
        if pos + _LEN.size > len(blob):
            raise ArtifactError(f"{where} is truncated; copy the ENCDIR again")
        (n,) = _LEN.unpack_from(blob, pos)
        parts.append(blob[pos + _LEN.size:pos + _LEN.size + n])
        pos += _LEN.size + n
    if pos != len(blob):
        raise ArtifactError(f"{where} is truncated or has trailing bytes; copy the ENCDIR again")
    return parts


class EncryptedServerModel(CKKSServerModel):
    """A CKKS model whose weights are ciphertexts under the client's key: evaluation is ciphertext x ciphertext,
    and only the evaluation keys of the bound key set are accepted."""

    def __init__(self, plan: Plan, weights: WeightCiphertexts, spec: dict[str, Any], backend: Any) -> None:
        self.plan = plan
        self.task = str(spec.get("task", "multi-class"))
        self.labels = list(spec.get("labels") or [str(i) for i in range(plan.output_count)])
        self.name = str(spec.get("model", "model"))
        self.backend = backend
        self.plains = weights
        self._public = {k: v for k, v in spec.items() if k not in ("scheme", "format", "model", "task", "labels")}
        self._lock = threading.Lock()
        self._program = None  # weights are ciphertexts: run instruction by instruction through the backend

    @property
    def key_id(self) -> str:
        return str(self._public["encrypted_model"]["key_id"])

    def load_keys(self, data: bytes) -> CKKSKeys:
        parts = envelope.unpack(data, envelope.KIND_KEYS, self.plan_id)
        if len(parts) != 2 or key_id_of(parts[0], parts[1]) != self.key_id:
            raise CiphertextError(f"these evaluation keys are not the key set this model's weights are encrypted "
                                  f"under (key id {self.key_id[:12]}): register the keys from the KEYDIR that "
                                  "medhe encrypt-model used")
        return super().load_keys(data)


def load_encrypted_model(encdir: str | os.PathLike, backend: Any = "auto") -> EncryptedServerModel:
    """The server side of an ENCDIR: program, spec and weight ciphertexts, every one checked (one-line errors).
    ``backend``: the ``backends`` registry name (or instance) that loads the weights and runs the program."""
    from medhe.he.ckks.backends import get_backend

    root = Path(encdir).expanduser()
    if not root.is_dir():
        raise ArtifactError(f"encrypted model folder {root} does not exist: make it with medhe encrypt-model")
    spec = _read_json(root / SPEC_FILE)
    doc = _read_json(root / PROGRAM_FILE)
    if not isinstance(spec, dict) or not isinstance(spec.get("encrypted_model"), dict) or not check_plan_id(spec):
        raise ArtifactError(f"{root / SPEC_FILE} is not a consistent encrypted-model spec (its plan id does not "
                            "match its contents); encrypt the model again")
    plan, _kinds = program_mod.load_program(doc)
    ours = encrypted_spec(plan, spec.get("task", "multi-class"), spec.get("labels") or [], spec.get("model", "model"))
    ours["encrypted_model"]["key_id"] = spec["encrypted_model"].get("key_id")
    if {k: v for k, v in ours.items() if k != "plan_id"} != {k: v for k, v in spec.items() if k != "plan_id"}:
        raise ArtifactError(f"{root / SPEC_FILE} does not describe {root / PROGRAM_FILE}: the folder mixes two "
                            "encrypted models; encrypt the model again")
    try:
        blob = (root / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{root / WEIGHTS_FILE} is missing; copy the whole ENCDIR") from None
    meta = doc.get("weights_file") or {}
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise ArtifactError(f"{root / WEIGHTS_FILE} does not match the checksum in {PROGRAM_FILE}: corrupted or "
                            "from another encryption; copy the ENCDIR again")
    parts = _split_weights(blob, root / WEIGHTS_FILE)
    if len(parts) != len(plan.plains):
        raise ArtifactError(f"{root / WEIGHTS_FILE} holds {len(parts)} ciphertexts, the program uses "
                            f"{len(plan.plains)}; encrypt the model again")
    be = get_backend(backend, plan.params)
    weights = WeightCiphertexts()
    for i, (part, p) in enumerate(zip(parts, plan.plains)):
        try:
            ct = be.load_ciphertext(part)
        except CiphertextError as exc:
            raise ArtifactError(f"weight ciphertext {i} of {root / WEIGHTS_FILE} is unusable ({exc})") from None
        if be.level(ct) != p.level or not math.isclose(be.scale(ct), p.scale, rel_tol=1e-9):
            raise ArtifactError(f"weight ciphertext {i} is at level {be.level(ct)}, scale 2^"
                                f"{math.log2(be.scale(ct)):.2f}; the program needs level {p.level}, scale 2^"
                                f"{math.log2(p.scale):.2f}: encrypt the model again")
        weights.append(ct)
    return EncryptedServerModel(plan, weights, spec, be)
