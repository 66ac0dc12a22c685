"""One HTTP/1.1 request on a raw socket, sent as a misbehaving client would: a body cut off, stalled or trickled.

The SDK (httpx) always sends a whole body at once; a soak or a hardening test needs the clients it does not model:
one that hangs up mid-body, one whose link is slow but within the server's read timeout, one that stalls past it,
one that never finishes its request head. ``RawRequest`` sends the head and then whatever parts of the body it is
told to, with pauses between them, and reads the answer (status, headers, body) if one comes. Loopback only: it is
for testing a server you run.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from medhe.service import protocol


@dataclass
class Reply:
    """What the server answered (``status`` 0: nothing before it closed or the wait ran out)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    closed_early: bool = False  # the server closed (or reset) before a complete answer arrived

    @property
    def code(self) -> str | None:
        """The JSON error's ``code`` (``body_timeout``, ``header_timeout``, ...), None for other bodies."""
        try:
            return json.loads(self.body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def head(method: str, path: str, length: int | None, token: str | None = None,
         headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {protocol.OCTET}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawRequest:
    """``with RawRequest(url) as r: r.send(head); r.send(part); r.reply(wait)`` — one connection, closed on exit."""

    def __init__(self, url: str, timeout: float = 30.0):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"raw test requests go to loopback servers only, not {host}")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sent = 0

    def __enter__(self) -> "RawRequest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> bool:
        """Send ``data``; False if the server has already closed the connection (e.g. after answering 408)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def send_paced(self, data: bytes, parts: int, pause: float, stop=None) -> bool:
        """``data`` in ``parts`` pieces with ``pause`` s between them (a slow link); False if the server closed."""
        step = max(1, -(-len(data) // max(1, parts)))
        for i in range(0, len(data), step):
            if i and pause > 0:
                time.sleep(pause)
            if not self.send(data[i:i + step]):
                return False
        return True

    def reply(self, wait: float) -> Reply:
        """Read until a complete answer has arrived, the server closes, or ``wait`` s pass."""
        deadline = time.monotonic() + wait
        data = b""
        closed = False
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                part = self.sock.recv(1 << 16)
            except socket.timeout:
                break
            except OSError:
                closed = True
                break
            if not part:
                closed = True
                break
            data += part
            if _complete(data):
                break
        return _parse(data, closed)


def _complete(data: bytes) -> bool:
    if b"\r\n\r\n" not in data:
        return False
    top, body = data.split(b"\r\n\r\n", 1)
    for line in top.decode("latin-1").lower().split("\r\n")[1:]:
        if line.startswith("content-length:"):
            return len(body) >= int(line.split(":", 1)[1])
    return False


def _parse(data: bytes, closed: bool) -> Reply:
    if not data.startswith(b"HTTP/1.1 ") or b"\r\n\r\n" not in data:
        return Reply(closed_early=closed)
    top, body = data.split(b"\r\n\r\n", 1)
    lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    complete = _complete(data)
    return Reply(status=int(lines[0][9:12]), headers=headers, body=body, closed_early=closed and not complete)
