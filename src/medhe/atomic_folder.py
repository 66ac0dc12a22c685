"""Whole-folder writes: a model, key or encrypted-model folder appears complete, or not at all.

Why: ``medhe.atomic`` makes each file atomic, but a folder is several files. Retraining into a model folder could
leave new weights beside the old ``card.json`` (silently wrong) and a SIGKILL during ``medhe keygen`` left a half
key folder with the secret key in a ``.secret.key.*.tmp`` file. So every file of such a folder is written into a
temp folder *beside* the target (same filesystem), ``.<name>.partial-<pid>-<process start>-<random>``, holding a
marker (:data:`MARKER`: which command, when); only when every file is written and synced is the temp folder
renamed over the target, in one step (Linux ``renameat2(RENAME_EXCHANGE)`` swaps it with an old folder, which is
then removed; elsewhere two renames, with ``.<name>.old-*`` recognised below). Until then the old folder is intact.

A run killed before the rename leaves only its ``.partial-*`` folder; the next write to the same target recognises
it by name (its owner process is gone), removes it and says so in one line on stderr. A folder whose owner is still
running is another write in progress: refused with one line.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medhe.errors import MedheError
from medhe.temproot import owner_alive, process_start

PARTIAL = "partial"
OLD = "old"
MARKER = ".medhe-partial.json"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask_dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def note(message: str) -> None:
    """One line on stderr about what medhe did to the user's files (never silent, never a traceback)."""
    print(f"medhe: {message}", file=sys.stderr, flush=True)


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    try:
        return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())
    except FileNotFoundError:
        return []


def _owner(path: Path, kind: str) -> tuple[int, int] | None:
    parts = path.name.rsplit(f".{kind}-", 1)[-1].split("-")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _marker(path: Path) -> dict:
    try:
        data = json.loads((path / MARKER).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def clear_interrupted(target: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes to ``target`` left beside it (one stderr line each); returns the removed.

    Raises ``MedheError`` when another process is writing ``target`` right now."""
    target = Path(target).expanduser()
    removed = []
    for path in _siblings(target, PARTIAL):
        owner = _owner(path, PARTIAL)
        info = _marker(path)
        what = info.get("command") or "medhe command"
        if owner is not None and owner[0] != os.getpid() and owner_alive(*owner):
            raise MedheError(f"another {what} (pid {owner[0]}) is writing {target} right now: wait for it to "
                             f"finish, or stop it and run this again")
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        started = f", started {info['started']}" if info.get("started") else ""
        note(f"removed {path}, left by an interrupted {what} (pid {owner[0] if owner else '?'}{started}); "
             f"it never became {target}")
    for path in _siblings(target, OLD):  # killed between the two renames of the fallback: restore or drop
        owner = _owner(path, OLD)
        if owner is not None and owner[0] != os.getpid() and owner_alive(*owner):
            continue
        if not target.exists() and (path / "content").is_dir():
            os.rename(path / "content", target)
            shutil.rmtree(path, ignore_errors=True)
            note(f"restored {target} from {path.name}, left by a write interrupted while replacing it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            note(f"removed {path}, the previous content of {target} left by an interrupted replacement")
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or filesystem cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install(tmp: Path, target: Path, replace: bool) -> None:
    try:
        os.rename(tmp, target)  # no target, or an empty folder: replaced in one step
        return
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise MedheError(f"{target} is a file, not a folder: choose another folder") from None
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not replace:
        raise MedheError(f"{target} was filled by someone else while medhe wrote it: choose another folder")
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old content
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{OLD}-{os.getpid()}-{process_start(os.getpid()) or 0}-",
                                dir=target.parent))
    os.rename(target, old / "content")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def running_command() -> str:
    """``medhe train`` / ``medhe recipe`` ... for the command line this process runs (the writer's name)."""
    argv = sys.argv or ["python"]
    if Path(argv[0]).name in ("medhe", "__main__.py", "-m") and len(argv) > 1 and not argv[1].startswith("-"):
        return f"medhe {argv[1]}"
    return Path(argv[0]).name or "python"


@contextmanager
def writing_folder(target: str | os.PathLike, command: str | None = None, *, replace: bool = False,
                   private: bool = False) -> Iterator[Path]:
    """Write a folder as a whole: yields a temp folder beside ``target``; when the block ends cleanly it is renamed
    over ``target`` (an existing non-empty one only with ``replace``), on an exception it is removed.

    ``command`` names the writer in the marker and in messages (default: :func:`running_command`); ``private`` makes the
    folder 0700 (key folders), otherwise it gets the mode a plain ``mkdir`` would.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_interrupted(target)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{PARTIAL}-{pid}-{process_start(pid) or 0}-",
                                dir=target.parent))
    try:
        os.chmod(tmp, 0o700 if private else _umask_dir_mode())
        marker = {"command": command or running_command(), "target": str(target), "pid": pid,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        yield tmp
        (tmp / MARKER).unlink()
        _fsync_dir(tmp)
        _install(tmp, target, replace)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
