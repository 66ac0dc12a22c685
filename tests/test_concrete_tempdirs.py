"""Concrete's compile folders live under medhe's temp root and go away (issue 32, item 8).

Concrete compiles every circuit into a fresh ``tempfile.mkdtemp()`` folder holding ``sharedlib.so`` (the model's
private weights as machine code) and never removes it: every TFHE worker start left two ``tmp*/`` folders in
TMPDIR. Checked on a real ``medhe serve`` of a TFHE model on 127.0.0.1 with its own TMPDIR: the folders sit under
``TMPDIR/medhe-<uid>/concrete-<worker pid>-*``, a server killed with SIGKILL leaves them there (nothing runs), the
next start recognises them by their dead owner and removes them, and a graceful stop removes its own.
"""

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from medhe import temproot
from medhe.he import client_for, compile_model
from medhe.models.artifact import load_artifact
from medhe.service.launch import ServerProcess

MODEL = "pneumoniamnist-qfcnn:tfhe"


def compile_folders(tmpdir: Path) -> dict[Path, int]:
    """Every folder holding a Concrete library under ``tmpdir`` -> the pid in its medhe scratch name (0: none)."""
    out = {}
    for lib in tmpdir.rglob("sharedlib.so"):
        scratch = lib.parent.parent
        owner = temproot._owner(scratch.name) if scratch.parent.name == f"medhe-{os.getuid()}" else None
        out[lib.parent] = owner[0] if owner else 0
    return out


@pytest.mark.slow  # two real server starts with a TFHE compile each, like the other server-driven tests
def test_tfhe_worker_compile_folders_are_medhes_and_are_removed(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir)}
    root = tmpdir / f"medhe-{os.getuid()}"

    first = ServerProcess([MODEL], workers=1, env=env).start()
    try:
        workers = set(first.worker_pids())
        found = compile_folders(tmpdir)
        assert found and set(found.values()) <= workers, (found, workers)  # none loose in TMPDIR (old: tmp*/)
        assert all(root in lib.parents for lib in found)
        assert [p.name for p in tmpdir.iterdir() if p.name.startswith("tmp")] == []
        assert (root.stat().st_mode & 0o777) == 0o700
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)  # server and worker die at once: no cleanup runs
        first.proc.wait()
        first.stop()
    left = compile_folders(tmpdir)
    assert left.keys() == found.keys()  # what a kill leaves, under medhe's root

    with ServerProcess([MODEL], workers=1, env=env) as second:
        now = compile_folders(tmpdir)
        assert now and not (now.keys() & left.keys())  # the dead worker's folders were recognised and removed
        assert set(now.values()) <= set(second.worker_pids())
    assert compile_folders(tmpdir) == {}  # a graceful stop removes its own
    assert [p for p in root.iterdir()] == []


def test_a_circuit_removes_its_folder_when_dropped(tmp_path, monkeypatch):
    """In-process (medhe evaluate, the tests): the folder lives exactly as long as the compiled circuit, which
    still runs encrypted after the compile, since Concrete loads the library from there on each run."""
    monkeypatch.setenv(temproot.ENV, str(tmp_path / "root"))
    server = compile_model(load_artifact("pneumoniamnist-qfcnn"), "tfhe")
    folder = server.circuit.medhe_scratch
    assert folder.parent == tmp_path / "root" and list(folder.rglob("sharedlib.so"))
    client = client_for(server.spec())
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    x = np.zeros(server.integer.in_shape, dtype=np.float32)
    logits = client.decrypt(server.infer(keys, client.encrypt(x)))
    assert logits.shape == (2,)
    del server, keys
    import gc

    gc.collect()
    assert not folder.exists()


@pytest.mark.slow  # a real server start with a TFHE compile, a key registration and one encrypted diagnosis
def test_a_worker_that_answered_an_inference_removes_its_folders_at_a_graceful_stop(tmp_path, data_dir):
    """Found by the soak (medhe bench --service --soak): once a circuit has run, Concrete's own exit handler (it
    stops its dataflow runtime) ends the worker before weakref's exit hook, so every worker that had answered an
    inference left its sharedlib.so folders behind at a graceful stop; an idle one did not."""
    from medhe.data import load_dataset
    from medhe.service.client import Client

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    image = load_dataset("pneumoniamnist", split="test", data_dir=str(data_dir)).images[0]
    with ServerProcess([MODEL], workers=1, env={"TMPDIR": str(tmpdir)}) as server:
        with Client(server.url) as client:
            assert client.diagnose(image).label in ("normal", "pneumonia")
        assert compile_folders(tmpdir)
    assert compile_folders(tmpdir) == {}
