"""medhe's own temp root: scratch folders of medhe and of its dependencies, each named by the process that owns it.

Why: Concrete compiles every TFHE circuit into a fresh ``tempfile.mkdtemp()`` folder (``sharedlib.so``: the model's
private weights as machine code) and never removes it (its ``cleanup()`` is a no-op), so every TFHE worker start
left two such folders in ``$TMPDIR``. Here they go under one private folder, ``$MEDHE_TMPDIR`` or
``$TMPDIR/medhe-<uid>`` (mode 0700), named ``<kind>-<pid>-<process start>-<random>``; the owner removes its folder
when it is done, and a folder whose owner is gone (killed with SIGKILL, which runs no cleanup) is recognised by
that name and removed by the next :func:`scratch` call of any medhe process.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medhe.errors import MedheError

ENV = "MEDHE_TMPDIR"
_NAME = re.compile(r"^([a-z0-9]+)-(\d+)-(\d+)-")
_REDIRECT = threading.Lock()


def root() -> Path:
    """The private temp root (created 0700 on first use); refuses one that another user owns."""
    configured = os.environ.get(ENV)
    path = Path(configured).expanduser() if configured else Path(tempfile.gettempdir()) / f"medhe-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise MedheError(f"cannot create medhe's temp folder {path} ({exc.strerror}): set {ENV} to a writable "
                         "folder") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise MedheError(f"{path} is not a folder of this user (a link, a file or someone else's): medhe keeps "
                         f"private scratch data there; remove it or set {ENV} to a private folder")
    if not configured and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or ``None`` if there is no such process: with the pid
    it names one process even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        if not Path("/proc/self/stat").exists():  # no procfs: fall back to "the pid exists"
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return 0
            return 0
        return None


def owner_alive(pid: int, started: int) -> bool:
    now = process_start(pid)
    return now is not None and (now == started or now == 0 or started == 0)


def _owner(name: str) -> tuple[int, int] | None:
    match = _NAME.match(name)
    return (int(match.group(2)), int(match.group(3))) if match else None


def sweep() -> list[Path]:
    """Remove every scratch folder under the root whose owning process is gone; returns what was removed."""
    removed = []
    base = root()
    for entry in base.iterdir():
        owner = _owner(entry.name)
        if owner is None or owner_alive(*owner):
            continue
        remove(entry)
        removed.append(entry)
    return removed


def scratch(kind: str) -> Path:
    """A new private folder (0700) for this process under the root; first sweeps folders of dead processes."""
    if not re.fullmatch(r"[a-z0-9]+", kind):
        raise ValueError(f"scratch kind must be lower-case letters and digits, not {kind!r}")
    sweep()
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{pid}-{process_start(pid) or 0}-", dir=root()))


def remove(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_with(owner: Any, path: str | os.PathLike) -> weakref.finalize:
    """Remove ``path`` when ``owner`` is garbage-collected or, at the latest, when the interpreter exits.

    weakref's own exit hook is not enough: it was registered with ``atexit`` early, and exit handlers run last
    registered first, so a library's handler registered later runs before it; Concrete's (it stops its dataflow
    runtime) ends the process once a circuit has run, and every TFHE worker that had answered an inference left
    its compile folder behind at a graceful stop (found by the soak, ``medhe bench --service --soak``). So the
    finalizer is also registered with ``atexit`` here, after the library was imported: it runs before that one
    (calling a finalizer a second time does nothing)."""
    finalizer = weakref.finalize(owner, remove, str(path))
    atexit.register(finalizer)
    return finalizer


@contextmanager
def tempfile_redirected(path: str | os.PathLike) -> Iterator[Path]:
    """Make ``tempfile.mkdtemp()`` / ``mkstemp()`` without ``dir=`` (a dependency's own temp folders) land in
    ``path`` for the duration of the block. One redirect at a time per process; other threads that create temp
    files without ``dir=`` meanwhile land there too, which is why the blocks are kept to one compile call."""
    with _REDIRECT:
        previous = tempfile.tempdir
        tempfile.tempdir = str(path)
        try:
            yield Path(path)
        finally:
            tempfile.tempdir = previous
