"""The encrypted diagnosis server: FastAPI app factory and the HTTP endpoints of protocol v1.

The server sees only public material: evaluation keys and ciphertexts in, ciphertexts out. Each client registers
its own evaluation keys and gets a key id, so concurrent clients never share key state. Every refusal is a 4xx
``{"error": {"code", "message"}}``; a failure inside a backend never takes the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import tempfile
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from medhe import __version__
from medhe.errors import CiphertextError, MedheError
from medhe.service import protocol
from medhe.service.catalog import ServedModel
from medhe.service.errors import ServiceError
from medhe.service.keystore import KeyStore, KeyTooLarge
from medhe.service.worker import WorkerPool

log = logging.getLogger("medhe.service")

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_BINARY_BODY = {"requestBody": {"required": True, "content": {protocol.OCTET: _BINARY}}}
_ERROR = {"description": "JSON error: {\"error\": {\"code\", \"message\"}}"}


def create_app(models: list[ServedModel], token: str | None = None, max_body: int = protocol.DEFAULT_MAX_BODY,
               key_ttl: float = protocol.DEFAULT_KEY_TTL, max_key_bytes: int = protocol.DEFAULT_MAX_KEY_BYTES,
               processes: int = 0, threads: int = 1,
               max_batch_bytes: int = protocol.DEFAULT_MAX_BATCH_BODY) -> FastAPI:
    """Build the app. Workers compile the models when the app starts (lifespan), so /v1/ready turns true then.

    ``processes``: worker processes for inference (0 = a thread pool of ``threads`` in this process).
    ``max_body`` caps one ciphertext upload; ``max_key_bytes`` caps all stored keys together (and so one upload).
    """
    catalog = {m.id: m for m in models}
    pool = WorkerPool([m.ref for m in models], processes=processes, threads=threads, key_cache_bytes=max_key_bytes)

    def release(entry) -> None:  # keys evicted (LRU cap) or expired: free them in their worker too
        slot, generation = entry.value
        pool.drop_keys(slot, generation, entry.key_id, entry.size)

    # The web process keeps only metadata: key id -> (worker slot, worker generation), model, size.
    keys = KeyStore(max_key_bytes, ttl=key_ttl, on_evict=release)
    state: dict[str, Any] = {"ready": False}

    def start_workers() -> None:
        """Compile every model in the workers (blocking, idempotent). ``medhe serve`` calls it before binding the
        port so a model that does not compile is a one-line error, not a half-started server."""
        if state["ready"]:
            return
        specs = pool.start()
        for model_id, spec in specs.items():
            catalog[model_id].spec = spec
        state["ready"] = True
        log.info("medhe serve: %d model(s) ready on %d worker slot(s)", len(catalog), pool.size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, start_workers)
        try:
            yield
        finally:
            state["ready"] = False
            pool.close()

    app = FastAPI(
        title="medhe encrypted diagnosis service", version=__version__, lifespan=lifespan,
        description=("Homomorphic-encryption inference: clients register public evaluation keys, upload "
                     "ciphertexts and decrypt the encrypted results themselves. Protocol: docs/service.md."),
    )
    app.state.keys = keys
    app.state.pool = pool
    app.state.start = start_workers
    app.state.catalog = catalog

    # -- errors: every refusal is JSON ---------------------------------------------------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(CiphertextError)
    async def _ciphertext_error(request: Request, exc: CiphertextError):
        return JSONResponse(ServiceError(422, "bad_ciphertext", str(exc)).to_json(), status_code=422)

    @app.exception_handler(MedheError)
    async def _medhe_error(request: Request, exc: MedheError):
        return JSONResponse(ServiceError(422, "rejected", str(exc)).to_json(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(ServiceError(exc.status_code, code, str(exc.detail)).to_json(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(ServiceError(422, "invalid_request", str(exc.errors()[:1])).to_json(), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(ServiceError(500, "internal_error",
                                         f"internal error ({type(exc).__name__}); see the server log").to_json(),
                            status_code=500)

    # -- helpers -------------------------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ServiceError(401, "unauthorized", "missing or wrong bearer token: pass --token or set MEDHE_TOKEN")

    def served(model_id: str) -> ServedModel:
        try:
            return catalog[model_id]
        except KeyError:
            raise ServiceError(404, "unknown_model",
                               f"no model {model_id!r} on this server; GET {protocol.models_path()} lists "
                               f"{', '.join(sorted(catalog))}") from None

    def require_ready() -> None:
        if not state["ready"]:
            raise ServiceError(503, "not_ready", "the server is still compiling its models; retry shortly")

    def check_upload(request: Request, limit: int, what: str) -> None:
        """Refuse a body of the wrong type, or one whose declared length is over ``limit``, before reading it."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != protocol.OCTET:
            raise ServiceError(415, "unsupported_media_type",
                               f"{what} must be sent as {protocol.OCTET}, not {ctype or 'no content type'}")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise ServiceError(413, "body_too_large",
                                       f"{what} of {int(declared)} bytes exceeds this server's limit of {limit} bytes")
            except ValueError:
                raise ServiceError(400, "bad_request", "Content-Length is not a number") from None

    async def read_body(request: Request, limit: int, what: str) -> bytes:
        """The raw binary body, refused with 413 as soon as it passes ``limit`` (never buffered past it)."""
        check_upload(request, limit, what)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ServiceError(413, "body_too_large", f"{what} exceeds this server's limit of {limit} bytes")
        if not body:
            raise ServiceError(400, "empty_body", f"the request has no body; send the {what} as the body")
        return bytes(body)

    async def spool_body(request: Request, limit: int, what: str) -> tuple[str, int]:
        """Like ``read_body`` but streamed to a private temporary file: (path, size). The caller deletes it.

        Evaluation keys reach hundreds of MB (cxr14-latent at N=32768: 0.56 GB). Held in this process they would
        cost the body, its ``bytes`` copy and the pickled copy sent to a worker, on top of the worker's own;
        spooled, this process holds one chunk and the worker reads the file once.
        """
        check_upload(request, limit, what)
        fd, path = tempfile.mkstemp(prefix="medhe-keys-", suffix=".bin")  # 0600: only this server reads it
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ServiceError(413, "body_too_large",
                                           f"{what} exceeds this server's limit of {limit} bytes")
                    fh.write(chunk)
            if not size:
                raise ServiceError(400, "empty_body", f"the request has no body; send the {what} as the body")
        except BaseException:
            _unlink(path)
            raise
        return path, size

    # -- endpoints -----------------------------------------------------------------------------------------------
    @app.get(f"{protocol.PREFIX}/health", tags=["ops"], summary="Liveness: the web process answers.")
    async def health() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get(f"{protocol.PREFIX}/ready", tags=["ops"], summary="Readiness: models compiled, workers up (503 before).",
             responses={503: _ERROR})
    async def ready() -> dict:
        require_ready()
        return {"ready": True, "models": sorted(catalog), "workers": pool.size,
                "keys": len(keys), "key_bytes": keys.total_bytes}

    @app.get(protocol.models_path(), tags=["models"],
             summary="Every served model with all a client needs: scheme, parameters, preprocessing, labels.")
    async def list_models(request: Request) -> dict:
        authorize(request)
        require_ready()
        return {"api": protocol.API_VERSION, "models": [m.describe() for m in catalog.values()]}

    @app.get(protocol.model_path("{model_id}"), tags=["models"], summary="One served model.",
             responses={404: _ERROR})
    async def get_model(model_id: str, request: Request) -> dict:
        authorize(request)
        require_ready()
        return served(model_id).describe()

    @app.get(protocol.client_stage_path("{model_id}"), tags=["models"],
             summary="Public weights (safetensors) of the network the client runs before encrypting.",
             response_class=Response, responses={200: {"content": {protocol.OCTET: _BINARY}}, 404: _ERROR})
    async def client_stage(model_id: str, request: Request) -> Response:
        authorize(request)
        model = served(model_id)
        if model.client_weights is None:
            raise ServiceError(404, "no_client_stage", f"model {model_id!r} has no client stage; encrypt the "
                                                       "preprocessed image directly")
        return Response(model.client_weights, media_type=protocol.OCTET)

    @app.post(protocol.keys_path("{model_id}"), tags=["keys"], status_code=201, openapi_extra=_BINARY_BODY,
              summary="Register this client's public evaluation keys for a model; returns a key id.",
              responses={401: _ERROR, 404: _ERROR, 413: _ERROR, 415: _ERROR, 422: _ERROR})
    async def register_keys(model_id: str, request: Request) -> dict:
        authorize(request)
        require_ready()
        model = served(model_id)
        path, size = await spool_body(request, keys.max_bytes, "evaluation keys")
        key_id = _new_key_id()
        try:
            placement = await pool.load_keys(model.id, key_id, path, size)  # validates: CiphertextError -> 422
        finally:
            _unlink(path)
        try:
            keys.add(model.id, placement, size, key_id=key_id)  # may evict least recently used keys
        except KeyTooLarge as exc:
            pool.drop_keys(*placement, key_id, size)
            raise ServiceError(413, "keys_too_large", str(exc)) from None
        return {"key_id": key_id, "model": model.id, "bytes": size, "expires_after_idle_s": keys.ttl}

    @app.delete(protocol.key_path("{key_id}"), tags=["keys"], status_code=204, response_class=Response,
                summary="Forget registered keys (they also expire after the idle TTL).", responses={404: _ERROR})
    async def delete_keys(key_id: str, request: Request) -> Response:
        authorize(request)
        entry = keys.remove(key_id)
        if entry is None:
            raise ServiceError(404, "unknown_key", "no such key id (already deleted or expired)")
        release(entry)
        return Response(status_code=204)

    @app.post(protocol.infer_path("{model_id}"), tags=["inference"], openapi_extra=_BINARY_BODY,
              response_class=Response,
              summary=f"Encrypted inference: ciphertext in, encrypted logits out. Header {protocol.KEY_HEADER} "
                      "names the registered keys.",
              responses={200: {"content": {protocol.OCTET: _BINARY}}, 400: _ERROR, 401: _ERROR, 404: _ERROR,
                         413: _ERROR, 415: _ERROR, 422: _ERROR})
    async def infer(model_id: str, request: Request) -> Response:
        authorize(request)
        require_ready()
        model = served(model_id)
        key_id = request.headers.get(protocol.KEY_HEADER, "").strip()
        if not key_id:
            raise ServiceError(400, "missing_key_id", f"send the key id from key registration in the "
                                                      f"{protocol.KEY_HEADER} header")
        entry = keys.get(key_id)
        if entry is not None and entry.value[1] != pool.generation[entry.value[0]]:
            keys.remove(key_id)  # its worker was replaced after a crash: the keys died with it
            entry = None
        if entry is None:
            raise ServiceError(404, "unknown_key", "unknown or expired key id; register your evaluation keys again")
        if entry.model != model.id:
            raise ServiceError(422, "key_model_mismatch", f"key id was registered for model {entry.model!r}, "
                                                          f"not {model.id!r}; register keys for this model")
        ciphertext = await read_body(request, max_body, "ciphertext")
        try:
            out, eval_ms = await pool.infer(entry.value[0], model.id, key_id, ciphertext)
        except ServiceError as exc:
            if exc.code == "unknown_key":
                keys.remove(key_id)
            raise
        return Response(out, media_type=protocol.OCTET, headers={protocol.EVAL_MS_HEADER: f"{eval_ms:.1f}"})

    from medhe.service.batch import install_batch_routes

    install_batch_routes(app, catalog, authorize, served, require_ready, max_batch_bytes, key_ttl)
    return app


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _new_key_id() -> str:
    return secrets.token_urlsafe(18)
