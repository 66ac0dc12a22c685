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
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from medhe import __version__
from medhe.errors import CiphertextError, MedheError
from medhe.service import protocol
from medhe.service.catalog import ServedModel
from medhe.service.errors import ServiceError
from medhe.service import limits
from medhe.service.admission import AdmissionMiddleware, AdmissionState
from medhe.service.audit import AuditLog
from medhe.service.audit_middleware import AuditMiddleware
from medhe.service.keystore import KeyStore, KeyTooLarge, hash_secret
from medhe.service.spool import SpoolDir, discard
from medhe.service.upload import StreamCheck
from medhe.service.worker import WorkerPool

log = logging.getLogger("medhe.service")

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_BINARY_BODY = {"requestBody": {"required": True, "content": {protocol.OCTET: _BINARY}}}
_ERROR = {"description": "JSON error: {\"error\": {\"code\", \"message\"}}"}


def create_app(models: list[ServedModel], token: str | None = None, max_body: int | None = None,
               key_ttl: float = protocol.DEFAULT_KEY_TTL, max_key_bytes: int = protocol.DEFAULT_MAX_KEY_BYTES,
               processes: int = 0, threads: int = 1, max_keys: int = protocol.DEFAULT_MAX_KEYS,
               max_keys_per_client: int = protocol.DEFAULT_MAX_KEYS_PER_CLIENT,
               spool_root: str | None = None,
               max_batch_bytes: int = protocol.DEFAULT_MAX_BATCH_BODY, pool_factory=None,
               audit: AuditLog | None = None, max_uploads: int = protocol.DEFAULT_MAX_UPLOADS,
               upload_wait: float = protocol.DEFAULT_UPLOAD_WAIT,
               body_timeout: float = protocol.DEFAULT_BODY_TIMEOUT,
               max_batch_key_bytes: int = protocol.DEFAULT_MAX_BATCH_KEY_BYTES) -> FastAPI:
    """Build the app. Workers compile the models when the app starts (lifespan), so /v1/ready turns true then.

    ``processes``: worker processes for inference (0 = a thread pool of ``threads`` in this process).
    ``max_body`` caps one ciphertext upload (``None``: what each model's spec needs, see ``limits``);
    ``max_key_bytes`` caps the memory all loaded key sets hold together, ``max_keys`` their number and
    ``max_keys_per_client`` the number per client address (least recently used evicted first).
    ``pool_factory(refs, key_cache_bytes, on_replace)``: another place to run inference with the ``WorkerPool``
    interface (``medhe serve --ray``: ``RayPool``, Ray actors across a cluster); ``processes``/``threads`` then
    do not apply. ``audit``: where every key registration, inference, batch and refusal is recorded
    (``audit_middleware``; ``medhe serve --audit-log``). ``max_uploads``/``upload_wait``: requests with a body
    in progress at once, and how long one waits for a slot (``admission``); ``body_timeout``: the longest stall
    between two chunks of a body (and, with ``protocol.MIN_BODY_RATE``, its whole deadline).
    ``max_batch_key_bytes``: memory all batch key sets hold together, as loaded.
    """
    catalog = {m.id: m for m in models}

    def forget_worker(slot: int, generation: int) -> None:  # a worker died: its keys died with it
        gone = keys.remove_where(lambda e: e.value == (slot, generation))
        if gone:
            log.warning("medhe serve: worker %d was replaced; %d key set(s) it held are forgotten", slot, len(gone))

    if pool_factory is None:
        pool = WorkerPool([m.ref for m in models], processes=processes, threads=threads,
                          key_cache_bytes=max_key_bytes, on_replace=forget_worker)
    else:
        pool = pool_factory([m.ref for m in models], max_key_bytes, forget_worker)

    def release(entry) -> None:  # keys evicted (caps) or expired: free them in their worker too
        slot, generation = entry.value
        pool.drop_keys(slot, generation, entry.key_id)

    # The web process keeps only metadata: key id -> (worker slot, worker generation), model, size held, owner.
    keys = KeyStore(max_key_bytes, ttl=key_ttl, on_evict=release, max_count=max_keys,
                    max_per_owner=max_keys_per_client)
    state: dict[str, Any] = {"ready": False, "spool": None}

    def start_workers() -> None:
        """Compile every model in the workers (blocking, idempotent). ``medhe serve`` calls it before binding the
        port so a model that does not compile is a one-line error, not a half-started server."""
        if state["ready"]:
            return
        if state["spool"] is None:
            state["spool"] = SpoolDir.create(spool_root)  # also removes killed servers' leftovers
        specs = pool.start()
        for model_id, spec in specs.items():
            catalog[model_id].spec = spec
            rules = pool.rules.get(model_id)
            catalog[model_id].limits = limits.describe(rules, max_body, max_key_bytes)
            if rules and rules.get("fingerprint"):
                catalog[model_id].wire = {"params_fingerprint": rules["fingerprint"]}
        state["ready"] = True
        log.info("medhe serve: %d model(s) ready on %d worker slot(s)", len(catalog), pool.size)

    def stop() -> None:
        """Stop and wait for every worker, remove the spool folder (idempotent)."""
        state["ready"] = False
        pool.close()
        if state["spool"] is not None:
            state["spool"].close()
            state["spool"] = None

    async def reaper() -> None:
        while True:
            await asyncio.sleep(2.0)
            pool.reap()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, start_workers)
        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            stop()

    app = FastAPI(
        title="medhe encrypted diagnosis service", version=__version__, lifespan=lifespan,
        description=("Homomorphic-encryption inference: clients register public evaluation keys, upload "
                     "ciphertexts and decrypt the encrypted results themselves. Protocol: docs/protocol.md."),
        # no Swagger UI / ReDoc: they load scripts from a CDN; /openapi.json is served below, behind the token
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    app.state.keys = keys
    app.state.pool = pool
    app.state.start = start_workers
    app.state.stop = stop
    app.state.catalog = catalog
    admission = app.state.admission = AdmissionState(max_uploads=max(1, int(max_uploads)),
                                                     upload_wait=float(upload_wait))
    app.add_middleware(AdmissionMiddleware, state=admission, body_timeout=body_timeout)
    if audit is not None:
        app.add_middleware(AuditMiddleware, audit=audit, version_of=lambda model_id: model_version(catalog, model_id))

    # -- errors: every refusal is JSON ---------------------------------------------------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(BodyTimeout)
    async def _body_timeout(request: Request, exc: BodyTimeout):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(ServiceError(408, "body_timeout", str(exc)).to_json(), status_code=408,
                            headers={"Connection": "close"})

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        log.warning("%s %s: %s", request.method, request.url.path, exc)  # one line: nobody is left to answer
        return Response(status_code=400)

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

    def key_secret(request: Request) -> str:
        secret = request.headers.get(protocol.KEY_SECRET_HEADER, "").strip()
        if not secret:
            raise ServiceError(400, "missing_key_secret", f"send the key_secret from key registration in the "
                                                          f"{protocol.KEY_SECRET_HEADER} header")
        return secret

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
                                       f"{what} of {int(declared)} bytes exceeds this server's limit of {limit} "
                                       "bytes for this model (GET the model: limits)")
            except ValueError:
                raise ServiceError(400, "bad_request", "Content-Length is not a number") from None

    async def chunks(request: Request, limit: int, what: str):
        """The body as it arrives, cut off with ``408 body_timeout`` when it stalls ``body_timeout`` s between two
        chunks or falls behind ``protocol.MIN_BODY_RATE`` after its first ``body_timeout`` s (a client trickling a
        byte at a time would otherwise hold its upload slot, spool file and socket for as long as it likes)."""
        declared = request.headers.get("content-length")
        expected = min(int(declared), limit) if declared and declared.isdigit() else limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + body_timeout + expected / protocol.MIN_BODY_RATE
        while True:
            wait = min(body_timeout, deadline - loop.time())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(request.receive(), wait)
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the {what} did not arrive in time (no data for {body_timeout:g} s, or slower "
                                  f"than {protocol.MIN_BODY_RATE >> 10} KiB/s); nothing was stored: send it "
                                  "again on a faster link") from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return

    async def stream(request: Request, limit: int, what: str, check: StreamCheck):
        """The body's chunks, each judged by ``check`` and the size limit before the caller keeps it."""
        size = 0
        try:
            async for chunk in chunks(request, limit, what):
                if not chunk:
                    continue
                size += len(chunk)
                if size > limit:
                    raise ServiceError(413, "body_too_large", f"{what} exceeds this server's limit of {limit} "
                                                              "bytes for this model (GET the model: limits)")
                check.feed(chunk)
                yield chunk
        except ClientDisconnect:
            raise ClientGone(f"the client disconnected during the upload of {what} after {size} bytes; "
                             "nothing was stored") from None
        if not size:
            raise ServiceError(400, "empty_body", f"the request has no body; send the {what} as the body")
        check.finish()

    async def read_body(request: Request, limit: int, what: str, check: StreamCheck) -> bytes:
        """The raw binary body, refused with 413 as soon as it passes ``limit`` (never buffered past it) and with
        422 as soon as its first bytes show it cannot be a message for this model."""
        check_upload(request, limit, what)
        parts = [chunk async for chunk in stream(request, limit, what, check)]
        return b"".join(parts)  # at most twice the limit for a moment, never a growing buffer's spare capacity

    async def spool_body(request: Request, limit: int, what: str, check: StreamCheck) -> tuple[str, int]:
        """Like ``read_body`` but streamed to a private file in this server's spool folder: (path, size). The
        caller deletes it. The file is created only once the first bytes have passed ``check``.

        Evaluation keys reach hundreds of MB (cxr14-latent at N=32768: 0.56 GB). Held in this process they would
        cost the body, its ``bytes`` copy and the pickled copy sent to a worker, on top of the worker's own;
        spooled, this process holds one chunk and the worker reads the file once.
        """
        check_upload(request, limit, what)
        fh, path, size = None, None, 0
        try:
            async for chunk in stream(request, limit, what, check):
                if fh is None:
                    fd, path = state["spool"].new_file()
                    fh = os.fdopen(fd, "wb")
                fh.write(chunk)
                size += len(chunk)
            fh.close()
        except BaseException:
            if fh is not None:
                fh.close()
            if path is not None:
                discard(path)
            raise
        return path, size

    # -- endpoints -----------------------------------------------------------------------------------------------
    @app.get(f"{protocol.PREFIX}/health", tags=["ops"], summary="Liveness: the web process answers.")
    async def health() -> dict:
        return {"status": "draining" if admission.draining else "ok", "version": __version__,
                "api": protocol.API_VERSION, "protocol_version": protocol.PROTOCOL_VERSION}

    @app.get(f"{protocol.PREFIX}/ready", tags=["ops"], summary="Readiness: models compiled, workers up (503 before).",
             responses={503: _ERROR})
    async def ready() -> dict:
        require_ready()
        pool.reap()
        by_model = getattr(pool, "live_by_model", None)  # Ray actors may hold some models only (--ray-replicas)
        return {"ready": True, "models": sorted(catalog), "workers": pool.live,
                **({"workers_by_model": by_model()} if by_model else {}),
                "keys": len(keys), "key_bytes": keys.total_bytes, "max_key_bytes": keys.max_bytes,
                **app.state.batch_accounting(), "uploads": admission.uploads, "max_uploads": admission.max_uploads}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(app.openapi())

    @app.get(protocol.models_path(), tags=["models"],
             summary="Every served model with all a client needs: scheme, parameters, preprocessing, labels.")
    async def list_models(request: Request) -> dict:
        authorize(request)
        require_ready()
        return {"api": protocol.API_VERSION, "protocol_version": protocol.PROTOCOL_VERSION,
                "models": [m.describe() for m in catalog.values()]}

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
        pool.reap()
        rules = pool.rules.get(model.id)
        held_estimate = rules["held_bytes"] if rules else 0
        if held_estimate > keys.max_bytes:
            raise ServiceError(413, "keys_too_large", f"one key set of {model.id!r} holds {held_estimate} bytes once "
                                                      f"loaded, more than this server's key memory of "
                                                      f"{keys.max_bytes} bytes; ask the operator to raise "
                                                      "--max-key-bytes")
        limit = min(rules["key_bytes"], keys.max_bytes) if rules else keys.max_bytes
        path, size = await spool_body(request, limit, "evaluation keys",
                                      StreamCheck(rules, "keys", "evaluation keys"))
        key_id, secret = _new_key_id(), secrets.token_urlsafe(32)
        try:
            placement, grown = await pool.load_keys(model.id, key_id, path, size, held_estimate)
        finally:
            discard(path)
        # the model's estimate of the loaded set, a function of its public spec: the same set always counts the
        # same (the worker's RSS growth, 84-281 MiB for identical CKKS sets, let 3 of 25 fit where 12 should)
        held = held_estimate or max(grown, size)
        owner = request.client.host if request.client else ""
        try:
            keys.add(model.id, placement, held, key_id=key_id, owner=owner, secret_hash=hash_secret(secret))
        except KeyTooLarge as exc:
            pool.drop_keys(*placement, key_id)
            raise ServiceError(413, "keys_too_large", str(exc)) from None
        return {"key_id": key_id, "key_secret": secret, "model": model.id, "bytes": size, "held_bytes": held,
                "expires_after_idle_s": keys.ttl}

    @app.delete(protocol.key_path("{key_id}"), tags=["keys"], status_code=204, response_class=Response,
                summary="Forget registered keys (they also expire after the idle TTL).", responses={404: _ERROR})
    async def delete_keys(key_id: str, request: Request) -> Response:
        authorize(request)
        entry = keys.remove(key_id, key_secret(request))
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
        entry = keys.get(key_id, key_secret(request))
        if entry is not None and not pool.holds(entry.value):
            keys.remove(key_id)  # its worker was replaced after a crash: the keys died with it
            entry = None
        if entry is None:
            raise ServiceError(404, "unknown_key", "unknown or expired key id; register your evaluation keys again")
        if entry.model != model.id:
            raise ServiceError(422, "key_model_mismatch", f"key id was registered for model {entry.model!r}, "
                                                          f"not {model.id!r}; register keys for this model")
        rules = pool.rules.get(model.id)
        limit = model.limits["input_bytes"] if model.limits else (max_body or protocol.DEFAULT_MAX_BODY)
        ciphertext = await read_body(request, limit, "ciphertext", StreamCheck(rules, "input", "encrypted input"))
        try:
            out, eval_ms = await pool.infer(entry.value[0], model.id, key_id, ciphertext)
        except ServiceError as exc:
            if exc.code == "unknown_key":
                keys.remove(key_id)
            raise
        return Response(out, media_type=protocol.OCTET, headers={protocol.EVAL_MS_HEADER: f"{eval_ms:.1f}"})

    from medhe.service.batch import install_batch_routes

    install_batch_routes(app, catalog, authorize, served, require_ready, spool_body, key_secret,
                         lambda prefix: state["spool"].new_file(prefix), max_batch_bytes, key_ttl,
                         remote=getattr(pool, "run_batch", None), max_key_bytes=max_batch_key_bytes,
                         max_keys_per_client=max_keys_per_client)
    return app


class BodyTimeout(Exception):
    """A request body stalled or trickled in too slowly: answered ``408 body_timeout`` and the connection closed."""


class ClientGone(Exception):
    """The client hung up mid-request: logged as one line, nothing answered (nobody would read it)."""


def model_version(catalog: dict[str, ServedModel], model_id: str) -> str | None:
    """The served model's card ``version`` (``None`` for a model not served, or a card without one)."""
    model = catalog.get(model_id)
    version = model.card.get("version") if model is not None else None
    return None if version is None else str(version)


def _new_key_id() -> str:
    return secrets.token_urlsafe(18)
