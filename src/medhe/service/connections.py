"""uvicorn's HTTP protocol with a deadline for every request head and a cap on open connections (issue 32).

uvicorn times out idle keep-alive connections only after a response: a connection that sends half a request head,
or nothing, stays open for good (3,000 of them stayed open for a minute, each holding a socket and a buffer). Here:

- a connection must deliver a complete request head within ``header_timeout`` seconds of its first byte (or of
  being opened): otherwise it gets ``408 header_timeout`` (JSON) if it had sent part of a head, and is closed;
- beyond ``max_connections`` open connections a new one gets ``503 too_many_connections`` with ``Retry-After``
  and is closed at once.

Request bodies have their own deadline in the app (``server.py``: a stall between chunks and a minimum rate), and
h11 bounds a head's size (16 KiB). The class extends ``JSONErrorHTTPProtocol``, so framing errors stay JSON.
"""

from __future__ import annotations

import json

from medhe.service import protocol
from medhe.service.http400 import JSONErrorHTTPProtocol


def _json_reply(status: str, code: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            "connection: close\r\n\r\n").encode() + body


def guarded_protocol(header_timeout: float = protocol.DEFAULT_HEADER_TIMEOUT,
                     max_connections: int = protocol.DEFAULT_MAX_CONNECTIONS) -> type:
    """The protocol class to give uvicorn (``uvicorn.Config(http=...)``) with these limits."""

    class GuardedHTTPProtocol(JSONErrorHTTPProtocol):  # type: ignore[misc, valid-type]
        HEADER_TIMEOUT = float(header_timeout)
        MAX_CONNECTIONS = int(max_connections)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._head_cycle = None
            self._head_started = False
            if len(self.connections) > self.MAX_CONNECTIONS:
                transport.write(_json_reply("503 Service Unavailable", "too_many_connections",
                                            f"this server has {self.MAX_CONNECTIONS} connections open, its limit; "
                                            "retry shortly", "retry-after: 1\r\n"))
                transport.close()
                return
            self._arm_head()

        def _arm_head(self) -> None:
            self._cancel_head()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(self.HEADER_TIMEOUT, self._head_expired)

        def _cancel_head(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def data_received(self, data: bytes) -> None:
            between = self.cycle is None or self.cycle.response_complete
            if between:  # these bytes start (or continue) a request head
                if self._head_timer is None:
                    self._arm_head()
                self._head_started = True
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._head_cycle:
                self._cancel_head()  # the head is complete: the app has the request (bodies have their deadline)
                self._head_started = False

        def connection_lost(self, exc) -> None:
            self._cancel_head()
            super().connection_lost(exc)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.cycle is not self._head_cycle or self.transport.is_closing():
                return
            if self._head_started:
                self.logger.warning("closing a connection that sent no complete request head in %g s",
                                    self.HEADER_TIMEOUT)
                self.transport.write(_json_reply("408 Request Timeout", "header_timeout",
                                                 f"the request head did not arrive within {self.HEADER_TIMEOUT:g} s; "
                                                 "send the whole request line and headers at once"))
            self.transport.close()

    return GuardedHTTPProtocol
