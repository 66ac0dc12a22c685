"""Where ``medhe serve`` and ``medhe ui`` log, and how: text for a terminal, or one JSON object per line.

A hospital's log collector (journald, Loki, ELK, Splunk) ingests one JSON object per line without parsing rules, so
``--log-format json`` makes every record, uvicorn's access lines included, ``{"time", "level", "logger",
"message", "event", ...}``. Records carry only what the code puts in them: no request body, header or payload is
ever logged, so no image, ciphertext, key or logit can reach a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Callable

from medhe.errors import MedheError

FORMATS = ("text", "json")
#: the loggers medhe's servers write through: uvicorn's (server and access lines) and medhe's own.
LOGGERS = ("uvicorn", "medhe")
_STANDARD = set(vars(logging.LogRecord("x", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
_installed: list[tuple[logging.Logger, logging.Handler, bool, int]] = []  # what to undo


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-05-09T07:35:25.123Z`` (also the audit log's clock)."""
    return _iso(datetime.now(timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside a message are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso(datetime.fromtimestamp(record.created, timezone.utc)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "event": getattr(record, "event", None) or "log",
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, http_version, status = record.args  # uvicorn's access line, as fields
            out.update(event="http_access", client=client, method=method, path=path, http_version=http_version,
                       status=status)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """uvicorn's own look (``INFO:     ...``; access lines with their status), for medhe's records too."""

    def __init__(self, use_colors: bool):
        super().__init__()
        from uvicorn.logging import AccessFormatter, DefaultFormatter

        self.default = DefaultFormatter("%(levelprefix)s %(message)s", use_colors=use_colors)
        self.access = AccessFormatter('%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
                                      use_colors=use_colors)

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            return self.access.format(record)
        return self.default.format(record)


def configure(log_format: str = "text", log_file: str | None = None, level: str = "info") -> Callable[..., None]:
    """Send uvicorn's and medhe's loggers to one handler (``log_file`` appended to, else stderr) in ``log_format``.

    Pass ``log_config=None`` to uvicorn afterwards so it keeps this set-up (it still applies ``--log-level`` to
    its own loggers). Calling it again replaces what an earlier call installed; ``reset()`` undoes it (a command
    run in-process, as the tests do, leaves logging as it found it). Returns ``say(message, event)``
    for the command's own start-up lines: printed to stderr as before with text logs on the terminal, a log
    record (JSON, or in the log file) otherwise, so a JSON log stream holds only JSON.
    """
    if log_format not in FORMATS:
        raise MedheError(f"--log-format {log_format!r}: choose one of {', '.join(FORMATS)}")
    if log_file:
        try:
            handler: logging.Handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise MedheError(f"cannot open --log-file {log_file}: {exc.strerror or exc}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    tty = not log_file and sys.stderr.isatty()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(use_colors=tty))
    reset()
    numeric = logging.getLevelName(level.upper())
    announce = logging.getLogger("medhe.cli")
    for name in (*LOGGERS, announce.name):
        logger = logging.getLogger(name)
        _installed.append((logger, handler, logger.propagate, logger.level))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    announce.setLevel(logging.INFO)  # start-up lines show whatever --log-level, as they do on a terminal
    plain = log_format == "text" and not log_file

    def say(message: str, event: str, level: int = logging.INFO, **fields: Any) -> None:
        if plain:
            print(message, file=sys.stderr, flush=True)
        else:
            announce.log(level, message, extra={"event": event, **fields})

    return say


def reset() -> None:
    """Remove what ``configure`` installed and give the loggers back their earlier propagation and levels."""
    handlers = set()
    for logger, handler, propagate, level in reversed(_installed):
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level
        handlers.add(handler)
    for handler in handlers:
        handler.close()
    _installed.clear()
