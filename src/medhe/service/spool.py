"""Where key uploads wait for their worker: one private directory per server, cleaned of dead servers' leftovers.

A key upload is streamed to a file (mode 0600) that the chosen worker reads, and deleted afterwards. If the server
is killed (SIGKILL, OOM killer, power loss) in between, nothing deletes it: hundreds of MB of a client's key
material would stay in ``$TMPDIR``. So each server spools into its own ``medhe-spool-*`` directory and holds an
exclusive ``flock`` on a lock file inside it for its whole life; the kernel drops the lock when the process dies,
however it dies. At start a server removes every ``medhe-spool-*`` directory whose lock it can take (its owner is
gone), and never one whose owner still runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("medhe.service")

PREFIX = "medhe-spool-"
LOCK = ".lock"


class SpoolDir:
    """This server's spool directory, locked while it lives. ``create()`` also removes dead servers' ones."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, root: str | os.PathLike | None = None) -> "SpoolDir":
        root = Path(root or tempfile.gettempdir())
        removed = clean_stale(root)
        if removed:
            log.warning("medhe serve: removed %d spool folder(s) left by server(s) that were killed", removed)
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))  # 0700
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, fd)

    def new_file(self, prefix: str = "medhe-keys-") -> tuple[int, str]:
        return tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=self.path)  # 0600: only this server reads it

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.close(self._lock_fd)
        except OSError:
            pass


def clean_stale(root: Path) -> int:
    """Remove every spool directory under ``root`` whose owning server is gone; returns how many."""
    removed = 0
    for path in root.glob(PREFIX + "*"):
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            fd = os.open(path / LOCK, os.O_RDWR)
        except FileNotFoundError:  # not locked yet: a server starting right now, or one that died at once
            try:
                if time.time() - path.stat().st_mtime < 60:
                    continue
            except OSError:
                continue
            fd = None
        except OSError:
            continue  # not ours to judge (other user)
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live server holds it
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            if fd is not None:
                os.close(fd)
    return removed
