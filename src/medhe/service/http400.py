"""uvicorn's HTTP protocol with protocol v1's JSON error for requests it cannot even parse.

When the HTTP framing itself is broken (not HTTP, a non-numeric Content-Length, a bad chunk header, ...),
uvicorn answers from its protocol class with a plain-text ``400 Invalid HTTP request received.``: the request
never reaches the application, so FastAPI's error handlers cannot shape it. This subclass of the protocol uvicorn
would pick (httptools if installed, else h11) overrides exactly that answer with ``{"error": {"code":
"bad_request", "message": ...}}``, so every refusal a client can get is the documented JSON.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def json_400(message: str) -> bytes:
    body = json.dumps({"error": {"code": "bad_request",
                                 "message": f"malformed HTTP request ({message.rstrip('.')}); send HTTP/1.1 with a "
                                            "valid request line, headers and body framing"}}).encode()
    return (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class JSONErrorHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    def send_400_response(self, msg: str) -> None:
        self.transport.write(json_400(msg))
        self.transport.close()
