"""Batch-mode endpoints of protocol v1: thousands of images per request, one image per CKKS slot.

An encrypted batch is large (145 MB for 4096 pneumoniamnist images), so the upload is streamed to a private
file in the server's locked spool folder (never held twice in memory, refused with 413 as soon as it passes the configured cap), evaluated
by medhe's batch kernel in a single evaluation thread (the kernel already uses every core), and the result is
streamed back from a temporary file. Batch plans are compiled in this process on first use; their keys
(relinearization only, ~0.65 MB as sent, 5.5 MB as SEAL holds them) live in their own key store, separate from
the single-image workers' keys, counted at what they hold once loaded (the batch server's ``key_held_bytes()``,
a function of the batch spec: the same set always counts the same) under ``--max-batch-key-bytes`` and the
per-client cap.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from medhe.errors import PlanError
from medhe.service import protocol
from medhe.service.errors import ServiceError
from medhe.service.keystore import KeyStore, KeyTooLarge, hash_secret
from medhe.service.spool import discard
from medhe.service.upload import StreamCheck

MAX_BATCH_KEY_BYTES = 64 * protocol.MiB  # largest batch key upload; one set is ~0.65 MB (relinearization keys)
STREAM_CHUNK = 1 << 20


class BatchModels:
    """Batch servers compiled on first use (``medhe.he.scheme.compile_batch``), one per served model whose scheme
    has a batch mode (CKKS)."""

    def __init__(self, catalog: dict[str, Any]) -> None:
        self.catalog = catalog
        self.servers: dict[str, Any] = {}
        self.rules: dict[str, dict[str, Any] | None] = {}  # upload framing bounds (service/limits.py) per model
        self.lock = threading.Lock()

    def get(self, model_id: str) -> Any:
        with self.lock:
            server = self.servers.get(model_id)
            if server is None:
                model = self.catalog[model_id]
                if not model.batch_capable:
                    raise ServiceError(422, "batch_unsupported", f"model {model_id!r} has no batch mode: it is for "
                                       "CKKS models compiled from their weights without a client stage (the "
                                       "model listing names batch endpoints where they exist)")
                from medhe.he.scheme import compile_batch
                from medhe.models.artifact import load_artifact

                try:
                    server = compile_batch(load_artifact(model.ref.source), model.ref.scheme)
                except PlanError as exc:
                    raise ServiceError(422, "batch_unsupported", f"model {model_id!r} cannot run in batch mode: "
                                       f"{exc}") from None
                from medhe.service.limits import rules_for

                self.rules[model_id] = rules_for(server)
                self.servers[model_id] = server
            return server


def _stream_file(path: str):
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(STREAM_CHUNK):
                yield chunk
    finally:
        discard(path)


def install_batch_routes(app: FastAPI, catalog: dict[str, Any], authorize: Callable[[Request], None],
                         served: Callable[[str], Any], require_ready: Callable[[], None],
                         spool_body: Callable[..., Any], key_secret: Callable[[Request], str],
                         new_file: Callable[[str], tuple[int, str]],
                         max_batch_bytes: int = protocol.DEFAULT_MAX_BATCH_BODY,
                         key_ttl: float = protocol.DEFAULT_KEY_TTL, remote: Callable[..., Any] | None = None,
                         max_key_bytes: int = protocol.DEFAULT_MAX_BATCH_KEY_BYTES,
                         max_keys_per_client: int = protocol.DEFAULT_MAX_KEYS_PER_CLIENT) -> None:
    """Add the batch endpoints to ``app``. The helpers are create_app's own: auth, model lookup, readiness, the
    streamed upload into the server's locked spool folder (``spool_body``), the key-secret header and
    ``new_file`` in that spool folder, so batch keys follow the same capability rule as single-image keys.
    ``remote(model_id, key_bytes, batch_bytes)``: evaluate elsewhere (``medhe serve --ray``: a Ray actor) instead
    of this process's evaluation thread; keys are still validated here. ``max_key_bytes``: memory all batch key
    sets hold together (as loaded), ``max_keys_per_client``: sets per client address (least recently used evicted
    first, for the per-client cap that client's own)."""
    from medhe.service.worker import trim_heap

    models = BatchModels(catalog)

    def freed(_entry) -> None:  # evicted or expired: SEAL gives the memory back to its pool, glibc to the OS
        trim_heap()

    keys = KeyStore(max_key_bytes, ttl=key_ttl, on_evict=freed, max_per_owner=max_keys_per_client)
    app.state.batch_accounting = lambda: {"batch_keys": len(keys), "batch_key_bytes": keys.total_bytes,
                                          "max_batch_key_bytes": keys.max_bytes}
    evaluator = ThreadPoolExecutor(1, thread_name_prefix="medhe-batch")  # one batch at a time: it uses all cores
    app.state.batch_models = models

    async def spool(request: Request, limit: int, what: str, check: StreamCheck) -> tuple[str, int]:
        """The server's own spooling, with batch mode's 413 code and advice."""
        try:
            return await spool_body(request, limit, what, check)
        except ServiceError as exc:
            if exc.code != "body_too_large":
                raise
            raise ServiceError(413, "batch_too_large", f"{what} exceeds this server's limit of {limit} bytes; send "
                               "fewer images per request (the SDK splits at the ciphertext batch size) or raise "
                               "--max-batch-bytes") from None

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
        path, size = await spool(request, MAX_BATCH_KEY_BYTES, "batch evaluation keys",
                                 StreamCheck(None, "keys", "batch evaluation keys"))
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        finally:
            discard(path)
        held = max(size, server.key_held_bytes())
        if held > keys.max_bytes:  # refused before SEAL allocates anything
            raise ServiceError(413, "keys_too_large", f"one batch key set of {model_id!r} holds {held} bytes once "
                                                      f"loaded, more than this server's batch key memory of "
                                                      f"{keys.max_bytes} bytes; ask the operator to raise "
                                                      "--max-batch-key-bytes")
        loaded = await run(server.load_keys, data)  # CiphertextError -> 422
        if remote is not None:
            loaded = data  # an actor elsewhere loads them again from these (validated) bytes
        del data
        secret = secrets.token_urlsafe(32)  # returned once; only its hash is kept
        owner = request.client.host if request.client else ""
        try:
            entry = keys.add(model_id, loaded, held, key_id=secrets.token_urlsafe(18), owner=owner,
                             secret_hash=hash_secret(secret))
        except KeyTooLarge as exc:
            raise ServiceError(413, "keys_too_large", str(exc)) from None
        return {"key_id": entry.key_id, "key_secret": secret, "model": model_id, "bytes": size, "held_bytes": held,
                "expires_after_idle_s": keys.ttl}

    @app.delete(protocol.batch_key_path("{model_id}", "{key_id}"), tags=["batch"], status_code=204,
                response_class=Response, summary="Forget batch keys (they also expire after the idle TTL).")
    async def batch_forget(model_id: str, key_id: str, request: Request) -> Response:
        authorize(request)
        secret = key_secret(request)
        entry = keys.get(key_id, secret)  # a wrong secret looks like an unknown id
        if entry is None or entry.model != model_id:
            raise ServiceError(404, "unknown_key", "no such batch key id (already deleted or expired)")
        keys.remove(key_id, secret)
        del entry
        trim_heap()
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
        entry = keys.get(key_id, key_secret(request))  # a wrong secret looks like an unknown id
        if entry is None:
            raise ServiceError(404, "unknown_key", "unknown or expired batch key id; register your batch keys again")
        if entry.model != model_id:
            raise ServiceError(422, "key_model_mismatch", f"batch key id was registered for model {entry.model!r}, "
                                                          f"not {model_id!r}; register keys for this model")
        server = await run(models.get, model_id)
        path, _size = await spool(request, max_batch_bytes, "encrypted batch",
                                  StreamCheck(models.rules[model_id], "input", "encrypted batch"))

        def evaluate() -> tuple[str, float]:
            import time

            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            finally:
                discard(path)
            t0 = time.perf_counter()
            out = server.infer_batch(entry.value, data)
            ms = (time.perf_counter() - t0) * 1e3
            del data
            fd, out_path = new_file("medhe-batch-out-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(out)
            return out_path, ms

        if remote is not None:
            def read() -> bytes:
                try:
                    with open(path, "rb") as fh:
                        return fh.read()
                finally:
                    discard(path)

            out, ms = await remote(model_id, entry.value, await run(read))
            return Response(out, media_type=protocol.OCTET, headers={protocol.EVAL_MS_HEADER: f"{ms:.1f}"})
        out_path, ms = await run(evaluate)
        return StreamingResponse(_stream_file(out_path), media_type=protocol.OCTET,
                                 headers={protocol.EVAL_MS_HEADER: f"{ms:.1f}",
                                          "Content-Length": str(os.path.getsize(out_path))})
