"""The key holder's folder (KEYDIR): one CKKS key set, made by SEAL, kept by the hospital for one encrypted model.

``secret.key``     SEAL secret key, file mode 0600; read only by the key holder's own commands, never sent.
``evaluation.keys`` Galois + relinearization keys in the compact seeded wire form, made once at key generation:
                   the same bytes are registered with the server every time, so their SHA-256 is a stable id of
                   the key set (``key_id``) that the encrypted model is bound to.
``keyset.json``    the public spec the keys were made for (with ``key_id`` and the spec's ``plan_id``) and the
                   compile options of that plan (``medhe encrypt-model`` compiles the model again with them).

Why a fixed key id: the server cannot check that evaluation keys belong to the secret key the weights were
encrypted under (that would need the secret key). It can check that they are the very key set the model owner
bound into the encrypted model, and refuse anything else with a clear 4xx instead of returning garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medhe import atomic
from medhe.atomic_folder import clear_interrupted, note, writing_folder
from medhe.errors import MedheError, SecurityError

SECRET_FILE = "secret.key"
EVAL_FILE = "evaluation.keys"
KEYSET_FILE = "keyset.json"
KEYSET_FORMAT = "medhe-ckks-keyset/1"
_PARTS = struct.Struct("<8sII")  # magic, Galois length, relinearization length
_MAGIC = b"MHCKEVK1"


def key_id_of(galois: bytes, relin: bytes) -> str:
    """The key set's id: SHA-256 of its evaluation keys exactly as registered (32 hex digits)."""
    h = hashlib.sha256()
    h.update(struct.pack("<QQ", len(galois), len(relin)))
    h.update(galois)
    h.update(relin)
    return h.hexdigest()[:32]


def pack_evaluation_keys(galois: bytes, relin: bytes) -> bytes:
    return _PARTS.pack(_MAGIC, len(galois), len(relin)) + galois + relin


def unpack_evaluation_keys(data: bytes, where: str) -> tuple[bytes, bytes]:
    if len(data) < _PARTS.size or data[:8] != _MAGIC:
        raise MedheError(f"{where} is not a medhe evaluation-key file; run medhe keygen again")
    _, ng, nr = _PARTS.unpack_from(data)
    if _PARTS.size + ng + nr != len(data):
        raise MedheError(f"{where} is truncated or corrupted; run medhe keygen again")
    return data[_PARTS.size:_PARTS.size + ng], data[_PARTS.size + ng:]


@dataclass
class KeyDir:
    """A loaded KEYDIR (the secret key is read lazily, only by :meth:`backend`)."""

    path: Path
    spec: dict[str, Any]
    galois: bytes
    relin: bytes
    compile_options: dict[str, Any]

    @property
    def key_id(self) -> str:
        return str(self.spec["encrypted_model"]["key_id"])

    @property
    def plan_id(self) -> str:
        return str(self.spec["plan_id"])

    def evaluation_key_parts(self) -> list[bytes]:
        return [self.galois, self.relin]

    def backend(self) -> Any:
        """A ``SealBackend`` holding this key set's secret key (key holder side only)."""
        from medhe.he.ckks.backends.seal import SealBackend
        from medhe.he.ckks.compiler.params import CKKSParams

        be = SealBackend(CKKSParams.from_dict(self.spec["params"]))
        secret = read_secret(self.path / SECRET_FILE)
        try:
            sk = be.context.from_secret_str(secret)
        except (ValueError, RuntimeError) as exc:
            raise SecurityError(f"{self.path / SECRET_FILE} is not a secret key for these parameters ({exc}); "
                                "run medhe keygen again") from None
        be.use_secret_key(sk)
        return be

    def check_matches(self, spec: dict[str, Any], where: str) -> None:
        """One-line error unless ``spec`` (a server's or an ENCDIR's) is the encrypted model of this key set."""
        enc = spec.get("encrypted_model") if isinstance(spec, dict) else None
        if not isinstance(enc, dict):
            raise MedheError(f"{where} has plaintext weights, it is not an encrypted model: drop --keys, or serve "
                             "the encrypted model (medhe serve --encrypted-model ENCDIR)")
        if str(enc.get("key_id")) != self.key_id:
            raise SecurityError(f"the keys in {self.path} (key id {self.key_id[:12]}) do not match {where}, "
                                f"encrypted under key id {str(enc.get('key_id'))[:12]}: pass the KEYDIR that "
                                "medhe encrypt-model used")
        if str(spec.get("plan_id")) != self.plan_id:
            raise SecurityError(f"the keys in {self.path} were made for another plan of this model than {where} "
                                "runs: run medhe keygen and medhe encrypt-model again")


def read_secret(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SecurityError(f"{path} is missing: this is not a KEYDIR made by medhe keygen") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"{path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):o}): "
                            f"run chmod 600 {path}")
    return path.read_bytes()


def load_keydir(path: str | os.PathLike) -> KeyDir:
    """The public parts of a KEYDIR, checked (``MedheError`` naming the problem)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MedheError(f"key folder {root} does not exist: create it with medhe keygen --model NAME --out {root}")
    try:
        spec = json.loads((root / KEYSET_FILE).read_text())
        data = (root / EVAL_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise MedheError(f"{root} lacks {Path(exc.filename).name}: this is not a KEYDIR made by medhe keygen") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MedheError(f"{root / KEYSET_FILE} is not valid JSON; run medhe keygen again") from None
    if not isinstance(spec, dict) or spec.get("format") != KEYSET_FORMAT or \
            not isinstance(spec.get("spec"), dict) or not isinstance(spec["spec"].get("encrypted_model"), dict) or \
            not isinstance(spec.get("compile_options"), dict):
        raise MedheError(f"{root / KEYSET_FILE} is not a medhe key set description; run medhe keygen again")
    galois, relin = unpack_evaluation_keys(data, str(root / EVAL_FILE))
    kd = KeyDir(root, spec["spec"], galois, relin, spec["compile_options"])
    if key_id_of(galois, relin) != kd.key_id:
        raise SecurityError(f"{root / EVAL_FILE} does not hash to the key id in {KEYSET_FILE}: the folder was "
                            "altered; run medhe keygen again")
    return kd


KEYDIR_FILES = (SECRET_FILE, EVAL_FILE, KEYSET_FILE)


def _leftovers_of(names: list[str], files: tuple[str, ...]) -> bool:
    """Every name is one of ``files`` or an older medhe's temp file of one (``.secret.key.abc123.tmp``)."""
    return all(n in files or (n.startswith(".") and n.endswith(".tmp") and n[1:-4].rsplit(".", 1)[0] in files)
               for n in names)


def prepare_keydir(out: str | os.PathLike) -> Path:
    """Check a KEYDIR-to-be before the slow part (compiling, key generation): what interrupted runs left is removed
    with one line each, anything else in the way is refused with one line."""
    root = Path(out).expanduser()
    clear_interrupted(root)
    clear_interrupted_keydir(root)
    return root


def clear_interrupted_keydir(root: Path) -> None:
    """An older medhe killed during keygen left the key set half written in KEYDIR itself (secret key, maybe in a
    ``.secret.key.*.tmp`` file, but no keyset.json): no command could use it, so it is removed with one line.
    A complete key set, or a folder with other files, is refused: keys are never overwritten."""
    if not root.is_dir():
        if root.exists():
            raise MedheError(f"{root} is a file, not a key folder: choose a new --out folder")
        return
    names = sorted(p.name for p in root.iterdir())
    if not names:
        return
    if KEYSET_FILE not in names and _leftovers_of(names, KEYDIR_FILES):
        for name in names:
            (root / name).unlink()
        secrets = [n for n in names if SECRET_FILE in n]
        note(f"{root} held an interrupted medhe keygen (no {KEYSET_FILE}; {', '.join(secrets) or 'no secret key'}"
             "): removed it, no key set was ever made from it")
        return
    raise MedheError(f"{root} exists and is not empty: keys are never overwritten; choose a new --out folder")


def create_keydir(spec_without_key: dict[str, Any], out: str | os.PathLike,
                  compile_options: dict[str, Any] | None = None) -> KeyDir:
    """SEAL key generation for an encrypted-model spec, written to a new KEYDIR; returns it loaded.

    ``spec_without_key`` comes from ``spec.encrypted_spec(plan, ...)``; the returned key set's spec is the same
    with the key id filled in and the plan id recomputed over it. ``compile_options``: those the plan was compiled
    with (recorded, so that the model can be compiled and encrypted again exactly). The folder is written as a
    whole (``medhe.atomic_folder``, mode 0700): a run killed midway leaves only a ``.KEYDIR.partial-*`` folder beside
    it, which the next keygen to the same KEYDIR removes with one line.
    """
    from medhe.he.ckks.backends.seal import SealBackend
    from medhe.he.ckks.encrypted.spec import bind_key
    from medhe.he.ckks.compiler.params import CKKSParams

    root = prepare_keydir(out)
    be = SealBackend(CKKSParams.from_dict(spec_without_key["params"]))
    be.keygen([int(s) for s in spec_without_key["rotation_steps"]], True)
    galois, relin = be.evaluation_key_bytes(spec_without_key["key_levels"])
    spec = bind_key(spec_without_key, key_id_of(galois, relin))
    with writing_folder(root, "medhe keygen", private=True) as tmp:
        atomic.write_bytes(tmp / SECRET_FILE, be.secret_key_bytes(), mode=0o600)
        atomic.write_bytes(tmp / EVAL_FILE, pack_evaluation_keys(galois, relin))
        atomic.write_json(tmp / KEYSET_FILE, {"format": KEYSET_FORMAT, "spec": spec,
                                              "compile_options": dict(compile_options or {})})
    return load_keydir(root)
