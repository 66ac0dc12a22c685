"""Which requests the app takes on at all: framing that could smuggle a request, a server draining for shutdown,
and a fixed number of upload slots, so the memory request bodies take is bounded by design (issue 32).

One ASGI middleware, outermost but for the audit log, in front of every route:

- ``Content-Length`` together with ``Transfer-Encoding`` is refused with ``400 bad_request`` and the connection
  closed: a proxy in front that frames by the length and this server, which frames by the chunks (RFC 9112 6.3),
  would otherwise disagree on where the next request starts (request smuggling).
- While draining (``medhe serve`` got SIGTERM) every new request but ``/v1/health`` gets ``503 shutting_down``
  with ``Retry-After`` and ``Connection: close``; requests already in flight run to their answer, which also
  closes its connection. ``inflight`` tells the server when it may stop.
- A request with a body (key registration, inference, batch) holds one of ``max_uploads`` slots from before its
  body is read until its answer is sent; one that waits ``upload_wait`` seconds for a slot gets ``503 busy`` with
  ``Retry-After``. Waiting costs only the socket: uvicorn stops reading a connection once 64 KiB are buffered.
  Hence the bound in docs/service.md: bodies held in the web process <= ``max_uploads`` x 2 x the largest input
  limit, spooled key and batch files <= ``max_uploads`` x their limits.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from medhe.service import protocol

_BODY_METHODS = {"POST", "PUT", "PATCH"}
_DISCARD_LIMIT = 8 << 20  # a draining server reads at most this much of a refused body before closing


@dataclass
class AdmissionState:
    """Shared between the middleware (which counts) and ``medhe serve`` (which drains and waits)."""

    max_uploads: int = protocol.DEFAULT_MAX_UPLOADS
    upload_wait: float = protocol.DEFAULT_UPLOAD_WAIT
    drain_retry_after: int = 5
    busy_retry_after: int = 2
    draining: bool = False
    drain_started: float | None = None
    inflight: int = 0
    uploads: int = 0
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    def drain(self) -> None:
        """Refuse new requests from now on (SIGTERM); in-flight ones go on."""
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # created inside the server's event loop
            self._slots = asyncio.Semaphore(self.max_uploads)
        return self._slots


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


async def _json(send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def _discard_body(receive, limit: int, timeout: float) -> bool:
    """Read and drop a refused request's body (at most ``limit`` bytes, ``timeout`` s between chunks), so that
    closing the connection after the answer does not reset it under the client; False if it was not all read."""
    seen = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            return False
        if message["type"] != "http.request":
            return False
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if seen > limit:
            return False


class AdmissionMiddleware:
    """See the module docstring; ``state`` is the ``AdmissionState`` that ``create_app`` keeps on ``app.state``."""

    def __init__(self, app, state: AdmissionState, body_timeout: float = protocol.DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.state = state
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        length, chunked = _header(scope, b"content-length"), _header(scope, b"transfer-encoding")
        close = [(b"connection", b"close")]
        if length is not None and chunked is not None:
            await _json(send, 400, "bad_request",
                        "the request has both Content-Length and Transfer-Encoding, which proxies and servers may "
                        "frame differently (request smuggling); send exactly one of them", close)
            return
        has_body = scope.get("method") in _BODY_METHODS and (chunked is not None or length not in (None, b"0"))
        if st.draining and scope.get("path") != f"{protocol.PREFIX}/health":
            if has_body:
                await _discard_body(receive, _DISCARD_LIMIT, min(self.body_timeout, 5.0))
            await _json(send, 503, "shutting_down",
                        f"this server is shutting down and takes no new requests; retry in {st.drain_retry_after} s "
                        "(another replica, or this one once restarted)",
                        [(b"retry-after", str(st.drain_retry_after).encode()), *close])
            return
        st.inflight += 1
        try:
            if not has_body:
                await self.app(scope, receive, self._closing_when_draining(send))
                return
            slots = st.slots()
            try:
                if slots.locked():
                    await asyncio.wait_for(slots.acquire(), st.upload_wait)
                else:  # a free slot is taken without yielding to the loop: nothing else runs in between
                    await slots.acquire()
            except asyncio.TimeoutError:
                await _json(send, 503, "busy",
                            f"all {st.max_uploads} upload slots of this server stayed taken for {st.upload_wait:g} s; "
                            f"retry in {st.busy_retry_after} s (the operator can raise --max-uploads)",
                            [(b"retry-after", str(st.busy_retry_after).encode())])
                return
            st.uploads += 1
            try:
                await self.app(scope, receive, self._closing_when_draining(send))
            finally:
                st.uploads -= 1
                slots.release()
        finally:
            st.inflight -= 1

    def _closing_when_draining(self, send):
        """An answer sent while draining closes its connection, so idle keep-alive connections end with it."""
        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and self.state.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)
        return wrapped
