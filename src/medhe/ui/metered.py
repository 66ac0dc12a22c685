"""An httpx transport for the SDK that counts the bytes each request sends and receives and reports its phases.

The page shows upload, server evaluation and download as separate steps with their sizes, but the SDK makes one
HTTP call per step pair. Wrapping its transport (``Client(url, transport=...)``) gives those numbers without a
second HTTP client: every request still goes through the SDK, whatever it sends (tokens, key secrets, retries).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

import httpx

#: (event, request, nbytes, response): "sending" (nbytes: request body), "sent" (body handed to the socket),
#: "received" (nbytes: response body as it came over the wire; ``response`` set).
Listener = Callable[[str, httpx.Request, int, "httpx.Response | None"], None]

_CHUNK = 1 << 20


class _ReportingStream(httpx.SyncByteStream):
    """The request body in chunks; after the last one the request is on the wire and the server is working."""

    def __init__(self, body: bytes, done: Callable[[], None]):
        self.body, self.done = body, done

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self.body), _CHUNK):
            yield self.body[start:start + _CHUNK]
        self.done()


class _CountingStream(httpx.SyncByteStream):
    """The response body as it arrives, counted; reports once it has all been read."""

    def __init__(self, inner: httpx.SyncByteStream, done: Callable[[int], None]):
        self.inner, self.done, self.count = inner, done, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.count += len(chunk)
            yield chunk
        self.done(self.count)

    def close(self) -> None:
        self.inner.close()


class MeteredTransport(httpx.BaseTransport):
    """Wraps ``inner`` (default: a plain ``httpx.HTTPTransport``); ``listener`` is set per diagnosis by the page."""

    def __init__(self, inner: httpx.BaseTransport | None = None):
        self.inner = inner or httpx.HTTPTransport()
        self.local = threading.local()
        self.sent = 0
        self.received = 0

    @property
    def listener(self) -> Listener | None:
        return getattr(self.local, "listener", None)

    @listener.setter
    def listener(self, value: Listener | None) -> None:
        self.local.listener = value

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        notify = self.listener or (lambda *a: None)
        notify("sending", request, len(body), None)
        request.stream = _ReportingStream(body, lambda: notify("sent", request, len(body), None))
        self.sent += len(body)
        response = self.inner.handle_request(request)

        def received(count: int) -> None:
            self.received += count
            notify("received", request, count, response)

        response.stream = _CountingStream(response.stream, received)
        return response

    def close(self) -> None:
        self.inner.close()

