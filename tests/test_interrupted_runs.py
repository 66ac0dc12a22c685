"""``medhe keygen`` and ``medhe encrypt-model`` killed with a real SIGKILL midway (issue 32, item 7).

The old code left the secret key in ``KEYDIR/.secret.key.*.tmp`` (or a half key folder, or a half ENCDIR) and the
next run refused the folder without saying the run had been interrupted. Now a killed run leaves only a marked
``.KEYDIR.partial-*`` folder (0700) beside the target and nothing in TMPDIR; the next run removes it with one line
and completes. Key folders an older medhe left half written are recognised the same way.
"""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from medhe.cli import main
from medhe.he.ckks.encrypted.keys import SECRET_FILE, load_keydir
from medhe.he.ckks.encrypted.model import load_encrypted_model

HERE = Path(__file__).resolve().parent
MODEL = "pneumoniamnist"


def env_with_tmpdir(tmpdir: Path) -> dict[str, str]:
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmpdir)}


def killed_run(env: dict, when: str, name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(HERE / "sigkill_at.py"), when, name, "--", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr  # killed at that point, neither finished nor failed


def rerun(capsys, *args: str) -> str:
    """The next run, in this process (real code; saves an interpreter start): its stderr."""
    capsys.readouterr()
    assert main(list(args)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def removal_note(err: str, command: str) -> str:
    notes = [ln for ln in err.splitlines() if ln.startswith("medhe: ")]
    assert len(notes) == 1 and f"interrupted {command}" in notes[0], err
    return notes[0]


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys") / "keys"
    assert main(["keygen", "--model", MODEL, "--out", str(out)]) == 0
    return out


def test_keygen_killed_with_the_secret_key_on_disk(tmp_path, capsys):
    """SIGKILL just before the secret key's temp file is renamed: the secret is on disk, in a temp file."""
    env = env_with_tmpdir(tmp_path / "tmpdir")
    out = tmp_path / "keys"
    killed_run(env, "before", SECRET_FILE, "keygen", "--model", MODEL, "--out", str(out))
    assert not out.exists()  # the old code left KEYDIR with .secret.key.*.tmp in it
    [partial] = [p for p in tmp_path.iterdir() if p.name.startswith(".keys.partial-")]
    assert stat.S_IMODE(partial.stat().st_mode) == 0o700
    secrets = [p for p in files_under(partial) if p.name.startswith(f".{SECRET_FILE}.")]
    assert len(secrets) == 1 and stat.S_IMODE(secrets[0].stat().st_mode) == 0o600
    assert files_under(tmp_path / "tmpdir") == []  # no secret (nor anything else) lying in TMPDIR

    note = removal_note(rerun(capsys, "keygen", "--model", MODEL, "--out", str(out)), "medhe keygen")
    assert partial.name in note and not partial.exists()
    load_keydir(out).backend()  # complete, and its secret key loads
    leftover_secrets = [p for p in files_under(tmp_path) if SECRET_FILE in p.name and p != out / SECRET_FILE]
    assert leftover_secrets == [] and files_under(tmp_path / "tmpdir") == []


def test_key_folder_half_written_by_an_older_medhe_is_recognised(keydir, tmp_path, capsys):
    """What the old code left (secret key in .secret.key.*.tmp inside KEYDIR, no keyset.json): removed with one line
    naming the interruption and the secret-key temp file, then a new key set is made."""
    out = tmp_path / "keys"
    out.mkdir(mode=0o700)
    shutil.copy2(keydir / SECRET_FILE, out / f".{SECRET_FILE}.q8zk2m1v.tmp")
    assert main(["keygen", "--model", MODEL, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("medhe: ")]
    assert len(lines) == 1 and "interrupted medhe keygen" in lines[0] and ".secret.key.q8zk2m1v.tmp" in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.keys", "keyset.json", "secret.key"]
    assert load_keydir(out).key_id != load_keydir(keydir).key_id


def test_encrypt_model_killed_midway_then_rerun(keydir, tmp_path, capsys):
    """SIGKILL after the weight ciphertexts are written: no half ENCDIR (the old code left weights.bin in it and
    refused the folder next time); the rerun removes the leftover with one line and the ENCDIR loads."""
    env = env_with_tmpdir(tmp_path / "tmpdir")
    enc = tmp_path / "enc"
    killed_run(env, "after", "weights.bin", "encrypt-model", "--model", MODEL, "--keys", str(keydir),
               "--out", str(enc), "--no-progress")
    assert not enc.exists()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".enc.partial-")]) == 1
    removal_note(rerun(capsys, "encrypt-model", "--model", MODEL, "--keys", str(keydir), "--out", str(enc),
                       "--no-progress"), "medhe encrypt-model")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".enc.")] == []
    server = load_encrypted_model(enc)
    assert server.key_id == load_keydir(keydir).key_id


def test_a_complete_key_set_is_never_overwritten(keydir, capsys):
    before = {p.name: p.read_bytes() for p in keydir.iterdir()}
    assert main(["keygen", "--model", MODEL, "--out", str(keydir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never overwritten" in err[0], err
    assert {p.name: p.read_bytes() for p in keydir.iterdir()} == before
