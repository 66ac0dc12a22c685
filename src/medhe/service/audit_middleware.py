"""The one place where requests meet the audit log: an ASGI middleware around the whole app.

Why a middleware rather than calls in each endpoint: every route, every refusal (whichever exception handler
shaped it, even a 404 for a route that does not exist) and every internal error passes here, so no endpoint can
forget to audit, and the endpoints stay about encryption. It sees only what the wire shows: method, path, status,
headers it picks by name, byte counts, and, for a refusal, the error code of the JSON body; for a key
registration it reads ``key_id`` out of the JSON answer and nothing else of it. Bodies are counted, never kept
(only the first bytes of a JSON answer, to read those fields).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

from medhe.service import protocol
from medhe.service.audit import AuditLog

_MAX_FIELD = 128  # client-chosen strings (model ids, key ids, unknown paths) are cut to this length
_JSON_PEEK = 16 << 10  # bytes of a JSON answer kept to read its error code or key id
_QUIET = {protocol.PREFIX + "/health", protocol.PREFIX + "/ready"}  # polled by probes: never audited


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")


#: (method, route template, action, audited when it succeeds). Refusals of any route are audited.
ROUTES = [(method, template, _pattern(template), action, audited) for method, template, action, audited in [
    ("POST", protocol.keys_path("{model}"), "register_keys", True),
    ("POST", protocol.infer_path("{model}"), "inference", True),
    ("DELETE", protocol.key_path("{key_id}"), "delete_keys", True),
    ("POST", protocol.batch_keys_path("{model}"), "register_batch_keys", True),
    ("POST", protocol.batch_infer_path("{model}"), "batch", True),
    ("DELETE", protocol.batch_key_path("{model}", "{key_id}"), "delete_batch_keys", True),
    ("GET", protocol.models_path(), "list_models", False),
    ("GET", protocol.batch_path("{model}"), "batch_spec", False),
    ("GET", protocol.client_stage_path("{model}"), "client_stage", False),
    ("GET", protocol.model_path("{model}"), "get_model", False),
    ("GET", "/openapi.json", "openapi", False),
]]


def classify(method: str, path: str) -> tuple[str | None, str, dict[str, str], bool]:
    """(action, route, path parameters, audited on success) of a request; action ``None`` for no known route."""
    for want, template, pattern, action, audited in ROUTES:
        match = pattern.match(path)
        if match and method == want:
            return action, f"{method} {template}", match.groupdict(), audited
    return None, f"{method} {path[:_MAX_FIELD]}", {}, False


def _short(value: str | None) -> str | None:
    return None if value is None else value[:_MAX_FIELD]


def _peek_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class AuditMiddleware:
    """``app.add_middleware(AuditMiddleware, audit=AuditLog(path), version_of=lambda model_id: "2")``."""

    def __init__(self, app, audit: AuditLog, version_of: Callable[[str], str | None]) -> None:
        self.app, self.audit, self.version_of = app, audit, version_of

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in _QUIET:
            await self.app(scope, receive, send)
            return
        action, route, params, audited = classify(scope["method"], scope["path"])
        seen = {"in": 0, "out": 0, "status": None, "json": False}
        peek = bytearray()

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def counted_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                seen["json"] = ctype.startswith(b"application/json")
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                seen["out"] += len(body)
                if seen["json"] and len(peek) < _JSON_PEEK:
                    peek.extend(body[:_JSON_PEEK - len(peek)])
            await send(message)

        started = time.perf_counter()
        failed = False
        try:
            await self.app(scope, counted_receive, counted_send)
        except Exception:
            failed = True
            raise
        finally:
            status = seen["status"] or 500
            if status >= 400 or failed or audited:
                self.audit.write(self._record(scope, action, route, params, status, failed, bytes(peek),
                                              seen["in"], seen["out"], started))

    def _record(self, scope, action, route, params, status, failed, peek, n_in, n_out, started) -> dict[str, Any]:
        answer = _peek_json(peek) if peek else {}
        if failed:
            outcome = "internal_error"
        elif status < 400:
            outcome = "ok"
        else:
            error = answer.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            outcome = str(code) if code else f"http_{status}"
        key_id = params.get("key_id")
        if key_id is None and action in ("register_keys", "register_batch_keys") and outcome == "ok":
            key_id = answer.get("key_id")
        if key_id is None:
            headers = dict(scope.get("headers", []))
            key_id = headers.get(protocol.KEY_HEADER.lower().encode(), b"").decode("latin-1").strip() or None
        model = params.get("model")
        if model is not None:
            model = f"{_short(model)}@{self.version_of(model) or 'unknown'}"
        client = scope.get("client")
        return {"event": action if outcome == "ok" else "refused", "action": action, "key_id": _short(key_id),
                "client": client[0] if client else None, "model": model, "route": route, "status": status,
                "outcome": outcome, "request_bytes": n_in, "response_bytes": n_out,
                "ms": round((time.perf_counter() - started) * 1e3, 1)}
