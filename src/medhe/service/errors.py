"""Errors of the encrypted diagnosis service, shared by the server (-> 4xx JSON) and the SDK (-> one-line message).

``ServiceError`` belongs to the ``MedheError`` family so the CLI prints it as one line; ``status`` and ``code``
are what the server puts on the wire as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from medhe.errors import MedheError


class ServiceError(MedheError):
    """A request the server refused (or would refuse): HTTP ``status``, a stable machine ``code``, a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = int(status)
        self.code = str(code)

    def __reduce__(self):  # keep status/code when crossing a process boundary
        return (type(self), (self.status, self.code, str(self)))

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": str(self)}}
