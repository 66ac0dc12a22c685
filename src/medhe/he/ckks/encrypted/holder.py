"""The key holder's two steps of an encrypted-weight model (P3), as ``medhe keygen`` and ``medhe encrypt-model``
run them: the hooks ``make_keydir`` and ``encrypt_model`` of ``medhe.he.scheme``, so the CLI only prints."""

from __future__ import annotations

import os
from typing import Any

from medhe.he.ckks.encrypted.keys import KeyDir, create_keydir, load_keydir, prepare_keydir
from medhe.he.ckks.encrypted.model import compile_for_encryption, prepare_encdir, spec_for, write_encrypted_model


def _compile(model: str, options: dict[str, Any]) -> tuple[Any, Any]:
    from medhe.models.artifact import load_artifact

    artifact = load_artifact(model)
    return artifact, compile_for_encryption(artifact, **options)


def make_keydir(model: str, out: str | os.PathLike, options: dict[str, Any]) -> tuple[Any, KeyDir]:
    """Compile ``model``'s encrypted-weight plan (``options``: poly_degree, scale_bits) and write one key set to
    the new folder ``out``; returns (artifact, key set). The folder is checked before the seconds of compiling."""
    prepare_keydir(out)
    artifact, plan = _compile(model, options)
    return artifact, create_keydir(spec_for(plan, artifact.card), out, options)


def encrypt_model(model: str, keydir: str | os.PathLike, out: str | os.PathLike,
                  progress: bool = True) -> tuple[Any, KeyDir, dict[str, Any]]:
    """Encrypt ``model``'s weights under ``keydir``'s key into the new folder ``out``; returns (artifact, key
    set, the ENCDIR's public spec)."""
    prepare_encdir(out)
    keys = load_keydir(keydir)
    artifact, plan = _compile(model, keys.compile_options)
    return artifact, keys, write_encrypted_model(plan, artifact.card, keys, out, progress=progress)
