"""The audit log: one JSON line per auditable request, appended to a file the server never rewrites.

A hospital must be able to say, months later, which key set asked which model (and which version of it) what,
from where, when, and how it ended. The audit log answers that with metadata only: never an image, ciphertext,
key, key secret or logit (the server never holds the latter in the clear anyway), only their sizes in bytes.

The file is opened with ``O_APPEND`` and each line is one ``write`` of a whole line, so concurrent writers and
log shippers never see half a line, and nothing is buffered in this process (each line is in the kernel once
``write`` returns). A failing write (disk full, file system gone) never fails the request or the server: it is
logged once as an error, and once more when lines get through again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from typing import Any

from medhe.errors import MedheError
from medhe.service.logs import utc_now

log = logging.getLogger("medhe.service.audit")

#: the fields of every audit line, in this order (``docs/service.md`` "Operations").
FIELDS = ("time", "event", "action", "key_id", "client", "model", "route", "status", "outcome",
          "request_bytes", "response_bytes", "ms")


class AuditLog:
    """An append-only JSON-lines file; ``write(record)`` never raises."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise MedheError(f"cannot open --audit-log {self.path}: {exc.strerror or exc}") from None
        self._failing = False
        self._lock = threading.Lock()  # only guards the failure flag; O_APPEND keeps concurrent lines whole

    def write(self, record: dict[str, Any]) -> None:
        fields = {"time": utc_now(), **record}
        line = (json.dumps(fields, separators=(",", ":"), ensure_ascii=True, default=str) + "\n").encode()
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(errno.EIO, f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            with self._lock:
                first, self._failing = not self._failing, True
            if first:
                log.error("audit log %s: write failed (%s); audit lines are lost until writes succeed again",
                          self.path, exc.strerror or exc, extra={"event": "audit_write_failed"})
            return
        if self._failing:
            with self._lock:
                recovered, self._failing = self._failing, False
            if recovered:
                log.warning("audit log %s: writes succeed again", self.path, extra={"event": "audit_write_ok"})

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
