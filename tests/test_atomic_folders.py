"""Model folders are written as a whole (issue 32, items 6, 7 and 16), checked through the real ``medhe train``.

A retrain is killed with a real SIGKILL right after its new weights reached the disk (``tests/sigkill_at.py``): the
old model must still be there byte for byte, never new weights beside the old card.json; the next run recognises
what the killed one left and says so in one line. ``medhe train --out DIR`` refuses to replace a trained model
without ``--force``, before it spends any time training.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medhe.atomic_folder import MARKER, writing_folder
from medhe.cli import main
from medhe.models.artifact import load_artifact

HERE = Path(__file__).resolve().parent
TRAIN = ["train", "--dataset", "pneumoniamnist", "--epochs", "1", "--limit", "32", "--batch-size", "16",
         "--no-progress", "--threads", "1"]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def killed_run(when: str, name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(HERE / "sigkill_at.py"), when, name, "--", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # really killed at that point, not finished or failed
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real model folder, trained by the real command line (seed 0)."""
    out = tmp_path_factory.mktemp("runs") / "model"
    assert main([*TRAIN, "--out", str(out), "--seed", "0"]) == 0
    return out


def test_train_refuses_to_overwrite_a_trained_model_without_force(trained, capsys):
    """Item 16: the refusal is one line naming --force, comes before training, and leaves the model untouched."""
    before = digest(trained)
    capsys.readouterr()
    assert main([*TRAIN, "--out", str(trained), "--seed", "1", "--epochs", "50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--force" in err[0] and "already holds" in err[0], err
    assert digest(trained) == before and leftovers(trained) == []


def test_train_never_replaces_files_that_are_not_a_model(tmp_path, capsys):
    """Writing the folder as a whole would delete anything else in it: refused even with --force."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.txt").write_text("the radiologist's notes\n")
    assert main([*TRAIN, "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "report.txt" in err and len(err.splitlines()) == 1, err
    assert (out / "report.txt").read_text() == "the radiologist's notes\n"


def test_retrain_killed_after_new_weights_keeps_the_old_model_whole(trained, tmp_path):
    """Items 6 and 7: SIGKILL after the new model.safetensors is on disk. The old code wrote it into DIR, beside the
    old card.json; now DIR is exactly the old model and the new files sit in a marked .partial folder beside it."""
    out = tmp_path / "model"
    subprocess.run(["cp", "-a", str(trained), str(out)], check=True)
    before = digest(out)
    killed_run("after", "model.safetensors", *TRAIN, "--out", str(out), "--seed", "1", "--force")
    assert digest(out) == before
    load_artifact(out)  # still a consistent model
    partial = leftovers(out)
    assert len(partial) == 1 and partial[0].startswith(".model.partial-"), partial
    assert (out.parent / partial[0] / MARKER).is_file() and (out.parent / partial[0] / "model.safetensors").is_file()

    # the next run names what the killed one left, removes it, and completes
    proc = subprocess.run([sys.executable, "-m", "medhe", *TRAIN, "--out", str(out), "--seed", "1", "--force"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("medhe: removed")]
    assert len(notes) == 1 and "interrupted medhe train" in notes[0] and partial[0] in notes[0], proc.stderr
    assert "Traceback" not in proc.stderr and leftovers(out) == []
    after = digest(out)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]
    assert load_artifact(out).card["training"]["seed"] == 1  # new weights with their own card


def test_a_model_folder_with_an_older_interrupted_write_is_recognised(trained, tmp_path, capsys):
    """What the old code left when killed mid-write (weights in a temp file, no card.json): replaced with a note."""
    out = tmp_path / "half"
    out.mkdir()
    (out / ".model.safetensors.k2j4x9.tmp").write_bytes((trained / "model.safetensors").read_bytes()[:1000])
    assert main([*TRAIN, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "held an incomplete model" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "model.safetensors"]
    load_artifact(out)


def test_a_write_in_progress_is_not_taken_for_an_interrupted_one(trained, tmp_path):
    """A .partial folder whose owner still runs is another writer at work: refused with one line, not deleted."""
    out = tmp_path / "busy"
    code = ("import sys, time\nfrom medhe.atomic_folder import writing_folder\n"
            "with writing_folder(sys.argv[1], 'medhe train') as tmp:\n"
            "    print(tmp, flush=True)\n    time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(writer.stdout.readline().strip())
        assert tmp.is_dir() and tmp.parent == tmp_path
        proc = subprocess.run([sys.executable, "-m", "medhe", *TRAIN, "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(err) == 1 and f"pid {writer.pid}" in err[0] and "writing" in err[0], proc.stderr
        assert tmp.is_dir() and not out.exists()
    finally:
        writer.kill()
        writer.wait()


def test_replacing_swaps_the_whole_folder_in_one_step(tmp_path):
    """The folder primitive itself: nothing of the new content is visible until the block ends, then all of it
    (no old file survives); an exception inside leaves the old folder and no temp folder."""
    target = tmp_path / "m"
    target.mkdir()
    (target / "card.json").write_text("old card")
    (target / "model.safetensors").write_text("old weights")
    with pytest.raises(RuntimeError):
        with writing_folder(target, "test", replace=True) as tmp:
            (tmp / "model.safetensors").write_text("new weights")
            raise RuntimeError("disk full")
    assert digest(target) == {"card.json": hashlib.sha256(b"old card").hexdigest(),
                              "model.safetensors": hashlib.sha256(b"old weights").hexdigest()}
    assert leftovers(target) == []
    with writing_folder(target, "test", replace=True) as tmp:
        (tmp / "model.safetensors").write_text("new weights")
        assert (target / "model.safetensors").read_text() == "old weights"
    assert sorted(os.listdir(target)) == ["model.safetensors"] and leftovers(target) == []
    assert (target / "model.safetensors").read_text() == "new weights"


def test_without_an_atomic_exchange_a_replacement_killed_between_renames_is_restored(tmp_path, monkeypatch,
                                                                                     capsys):
    """Where renameat2 is missing the old folder is first moved to .NAME.old-*; a run killed right then leaves no
    target, and the next write puts the old model back before anything else (one line)."""
    import medhe.atomic_folder as af

    target = tmp_path / "m"
    target.mkdir()
    (target / "card.json").write_text("old card")
    monkeypatch.setattr(af, "_exchange", lambda a, b: False)
    with writing_folder(target, "test", replace=True) as tmp:
        (tmp / "card.json").write_text("new card")
    assert (target / "card.json").read_text() == "new card" and leftovers(target) == []

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".m.old-{int(dead.stdout)}-1-abc123"  # what a kill between the two renames leaves
    old.mkdir()
    target.rename(old / "content")
    af.clear_interrupted(target)
    assert (target / "card.json").read_text() == "new card" and leftovers(target) == []
    assert "restored" in capsys.readouterr().err
