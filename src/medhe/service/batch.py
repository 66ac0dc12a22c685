"""Batch-mode endpoints of protocol v1: thousands of images per request, one image per CKKS slot.

An encrypted batch is large (145 MB for 4096 pneumoniamnist images), so the upload is streamed to a private
temporary file (never held twice in memory, refused with 413 as soon as it passes the configured cap), evaluated
by medhe's batch kernel in a single evaluation thread (the kernel already uses every core), and the result is
streamed back from a temporary file. Batch plans are compiled in this process on first use; their keys
(relinearization only, ~0.65 MB) live in their own key store, separate from the single-image workers' keys.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from medhe.errors import PlanError
from medhe.service import protocol
from medhe.service.errors import ServiceError
from medhe.service.keystore import KeyStore, KeyTooLarge

MAX_BATCH_KEY_BYTES = 64 * protocol.MiB  # one batch key set is ~0.65 MB (relinearization keys only)
STREAM_CHUNK = 1 << 20


class BatchModels:
    """Batch servers compiled on first use, one per served CKKS model."""

    def __init__(self, catalog: dict[str, Any]) -> None:
        self.catalog = catalog
        self.servers: dict[str, Any] = {}
        self.lock = threading.Lock()

    def get(self, model_id: str) -> Any:
        with self.lock:
            server = self.servers.get(model_id)
            if server is None:
                model = self.catalog[model_id]
                if model.ref.scheme != "ckks":
                    raise ServiceError(422, "batch_unsupported", f"model {model_id!r} is served with "
                                       f"{model.ref.scheme}; batch mode is for CKKS models")
                from medhe.he.ckks.batch.server import compile_ckks_batch
                from medhe.models.artifact import load_artifact

                try:
                    server = compile_ckks_batch(load_artifact(model.ref.source))
                except PlanError as exc:
                    raise ServiceError(422, "batch_unsupported", f"model {model_id!r} cannot run in batch mode: "
                                       f"{exc}") from None
                self.servers[model_id] = server
            return server


async def _spool(request: Request, limit: int, what: str, hint: str) -> tuple[str, int]:
    """Stream the body to a private temporary file; 413 before reading when the declared length is over
    ``limit``, and as soon as the streamed bytes pass it. Returns (path, size); the caller deletes the file."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != protocol.OCTET:
        raise ServiceError(415, "unsupported_media_type",
                           f"{what} must be sent as {protocol.OCTET}, not {ctype or 'no content type'}")
    declared = request.headers.get("content-length")
    too_large = ServiceError(413, "batch_too_large", f"{what} exceeds this server's limit of {limit} bytes; {hint}")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ServiceError(413, "batch_too_large", f"{what} of {int(declared)} bytes exceeds this server's "
                                   f"limit of {limit} bytes; {hint}")
        except ValueError:
            raise ServiceError(400, "bad_request", "Content-Length is not a number") from None
    fd, path = tempfile.mkstemp(prefix="medhe-batch-", suffix=".bin")  # 0600: only this server reads it
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                fh.write(chunk)
        if not size:
            raise ServiceError(400, "empty_body", f"the request has no body; send the {what} as the body")
    except BaseException:
        _unlink(path)
        raise
    return path, size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _stream_file(path: str):
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(STREAM_CHUNK):
                yield chunk
    finally:
        _unlink(path)


def install_batch_routes(app: FastAPI, catalog: dict[str, Any], authorize: Callable[[Request], None],
                         served: Callable[[str], Any], require_ready: Callable[[], None],
                         max_batch_bytes: int = protocol.DEFAULT_MAX_BATCH_BODY,
                         key_ttl: float = protocol.DEFAULT_KEY_TTL) -> None:
    """Add the batch endpoints to ``app`` (the helpers are create_app's own auth/lookup/readiness checks)."""
    models = BatchModels(catalog)
    keys = KeyStore(MAX_BATCH_KEY_BYTES, ttl=key_ttl)
    evaluator = ThreadPoolExecutor(1, thread_name_prefix="medhe-batch")  # one batch at a time: it uses all cores
    app.state.batch_models = models
    hint = "send fewer images per request (the SDK splits at the ciphertext batch size) or raise --max-batch-bytes"

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(evaluator, fn, *args)

    @app.get(protocol.batch_path("{model_id}"), tags=["batch"],
             summary="Batch-mode spec of a CKKS model: one image per slot, relinearization keys only.")
    async def batch_spec(model_id: str, request: Request) -> dict:
        authorize(request)
        require_ready()
        served(model_id)
        server = await run(models.get, model_id)
        return {**server.spec(), "max_batch_bytes": max_batch_bytes,
                "endpoints": {"keys": protocol.batch_keys_path(model_id), "infer": protocol.batch_infer_path(model_id)}}

    @app.post(protocol.batch_keys_path("{model_id}"), tags=["batch"], status_code=201,
              summary="Register relinearization keys for batch mode; returns a batch key id.")
    async def batch_keys(model_id: str, request: Request) -> dict:
        authorize(request)
        require_ready()
        served(model_id)
        server = await run(models.get, model_id)
        path, size = await _spool(request, MAX_BATCH_KEY_BYTES, "batch evaluation keys",
                                  "send the relinearization keys of a batch client")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        finally:
            _unlink(path)
        loaded = await run(server.load_keys, data)  # CiphertextError -> 422
        try:
            entry = keys.add(model_id, loaded, size, key_id=secrets.token_urlsafe(18))
        except KeyTooLarge as exc:
            raise ServiceError(413, "keys_too_large", str(exc)) from None
        return {"key_id": entry.key_id, "model": model_id, "bytes": size, "expires_after_idle_s": keys.ttl}

    @app.delete(protocol.batch_key_path("{model_id}", "{key_id}"), tags=["batch"], status_code=204,
                response_class=Response, summary="Forget batch keys (they also expire after the idle TTL).")
    async def batch_forget(model_id: str, key_id: str, request: Request) -> Response:
        authorize(request)
        entry = keys.get(key_id)
        if entry is None or entry.model != model_id:
            raise ServiceError(404, "unknown_key", "no such batch key id (already deleted or expired)")
        keys.remove(key_id)
        return Response(status_code=204)

    @app.post(protocol.batch_infer_path("{model_id}"), tags=["batch"], response_class=StreamingResponse,
              summary=f"One encrypted batch in (streamed to disk), its encrypted logits out (streamed). Header "
                      f"{protocol.KEY_HEADER} names the registered batch keys.")
    async def batch_infer(model_id: str, request: Request) -> StreamingResponse:
        authorize(request)
        require_ready()
        served(model_id)
        key_id = request.headers.get(protocol.KEY_HEADER, "").strip()
        if not key_id:
            raise ServiceError(400, "missing_key_id", f"send the batch key id in the {protocol.KEY_HEADER} header")
        entry = keys.get(key_id)
        if entry is None:
            raise ServiceError(404, "unknown_key", "unknown or expired batch key id; register your batch keys again")
        if entry.model != model_id:
            raise ServiceError(422, "key_model_mismatch", f"batch key id was registered for model {entry.model!r}, "
                                                          f"not {model_id!r}; register keys for this model")
        server = await run(models.get, model_id)
        path, _size = await _spool(request, max_batch_bytes, "encrypted batch", hint)

        def evaluate() -> tuple[str, float]:
            import time

            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            finally:
                _unlink(path)
            t0 = time.perf_counter()
            out = server.infer_batch(entry.value, data)
            ms = (time.perf_counter() - t0) * 1e3
            del data
            fd, out_path = tempfile.mkstemp(prefix="medhe-batch-out-", suffix=".bin")
            with os.fdopen(fd, "wb") as fh:
                fh.write(out)
            return out_path, ms

        out_path, ms = await run(evaluate)
        return StreamingResponse(_stream_file(out_path), media_type=protocol.OCTET,
                                 headers={protocol.EVAL_MS_HEADER: f"{ms:.1f}",
                                          "Content-Length": str(os.path.getsize(out_path))})
