"""Where encrypted inference actually runs: compiled models plus a cache of deserialized evaluation keys.

seal-python (and other native backends) hold the GIL for the whole of each call, so evaluating on the web
process's threads stalls health checks and gives no parallelism. ``WorkerPool`` therefore runs ``WorkerState``
in worker *processes* (one single-process executor per slot, so each slot keeps its own key cache), or in a
thread pool when ``processes=0`` (cheaper to start; fine for tests and single users). A worker that dies — a
native crash on hostile input — is replaced and the request that killed it gets an error, the server stays up.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from typing import Any

from medhe.errors import MedheError
from medhe.he.scheme import compile_model
from medhe.models.artifact import load_artifact
from medhe.service.catalog import ModelRef
from medhe.service.errors import ServiceError
from medhe.service.keystore import KeyStore


class KeysNotLoaded(MedheError):
    """The worker does not hold these keys (evicted, or a fresh worker): send the serialized keys along."""


class WorkerState:
    """Compiled models and deserialized keys of one worker (process or the thread pool)."""

    def __init__(self, refs: list[ModelRef], key_cache_bytes: int):
        self.models = {}
        for ref in refs:
            self.models[ref.id] = compile_model(load_artifact(ref.source), ref.scheme, **dict(ref.options))
        self.keys = KeyStore(key_cache_bytes, ttl=None)

    def specs(self) -> dict[str, dict]:
        return {model_id: model.spec() for model_id, model in self.models.items()}

    def load_keys(self, model_id: str, key_id: str, data: bytes) -> None:
        """Deserialize and validate keys (``CiphertextError`` if they do not fit the model) and cache them."""
        keys = self.models[model_id].load_keys(data)
        self.keys.add(model_id, keys, len(data), key_id=key_id)

    def infer(self, model_id: str, key_id: str, ciphertext: bytes, key_data: bytes | None) -> tuple[bytes, float]:
        entry = self.keys.get(key_id)
        if entry is None:
            if key_data is None:
                raise KeysNotLoaded(key_id)
            self.load_keys(model_id, key_id, key_data)
            entry = self.keys.get(key_id)
        start = time.perf_counter()
        out = self.models[model_id].infer(entry.value, ciphertext)
        return out, (time.perf_counter() - start) * 1000.0

    def drop_keys(self, key_id: str) -> None:
        self.keys.remove(key_id)


# -- process-side entry points (module level so they pickle by name) ---------------------------------------------
_STATE: WorkerState | None = None


def _init_process(refs: list[ModelRef], key_cache_bytes: int, threads: int) -> None:
    global _STATE
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except Exception:  # pragma: no cover - torch is a hard dependency, this is belt and braces
        pass
    _STATE = WorkerState(refs, key_cache_bytes)


def _call(method: str, *args: Any) -> Any:
    assert _STATE is not None, "worker process not initialised"
    return getattr(_STATE, method)(*args)


class WorkerPool:
    """Dispatches calls to worker slots, least busy first, preferring a slot that already holds the client's keys."""

    def __init__(self, refs: list[ModelRef], processes: int = 0, threads: int = 2,
                 key_cache_bytes: int = 1 << 32):
        self.refs = list(refs)
        self.processes = max(0, int(processes))
        self.threads = max(1, int(threads))
        self.key_cache_bytes = key_cache_bytes
        self._slots: list[Executor] = []
        self._busy: list[int] = []
        self._has_keys: list[set[str]] = []
        self._local: WorkerState | None = None
        self._lock = threading.Lock()
        self.restarts = 0

    @property
    def size(self) -> int:
        return len(self._slots)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _new_process_slot(self) -> Executor:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs an event loop and threads
        return ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_process,
                                   initargs=(self.refs, self.key_cache_bytes, 1))

    def start(self) -> dict[str, dict]:
        """Compile every model in every worker (blocking) and return the specs; all workers must agree."""
        if self.processes:
            self._slots = [self._new_process_slot() for _ in range(self.processes)]
            specs = [slot.submit(_call, "specs").result() for slot in self._slots]
            if any(s != specs[0] for s in specs[1:]):
                raise MedheError("workers compiled different parameters for the same model; compilation must be "
                                 "deterministic (report this as a bug)")
            spec = specs[0]
        else:
            self._local = WorkerState(self.refs, self.key_cache_bytes)
            self._slots = [ThreadPoolExecutor(self.threads, thread_name_prefix="medhe-infer")]
            spec = self._local.specs()
        self._busy = [0] * len(self._slots)
        self._has_keys = [set() for _ in self._slots]
        return spec

    def close(self) -> None:
        for slot in self._slots:
            slot.shutdown(wait=False, cancel_futures=True)
        self._slots = []

    # -- dispatch --------------------------------------------------------------------------------------------------
    def _pick(self, key_id: str) -> int:
        with self._lock:
            best = min(range(len(self._slots)), key=lambda i: (self._busy[i], key_id not in self._has_keys[i]))
            self._busy[best] += 1
            return best

    async def _run(self, slot: int, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            if self._local is not None:
                fn = getattr(self._local, method)
                return await loop.run_in_executor(self._slots[slot], fn, *args)
            return await asyncio.wrap_future(self._slots[slot].submit(_call, method, *args))
        except BrokenProcessPool:
            self._replace(slot)
            raise ServiceError(500, "worker_crashed",
                               "the inference worker crashed on this request and was restarted; "
                               "check the ciphertext and keys were made for this model") from None

    def _replace(self, slot: int) -> None:
        with self._lock:
            old = self._slots[slot]
            if getattr(old, "_broken", False):
                old.shutdown(wait=False, cancel_futures=True)
                self._slots[slot] = self._new_process_slot()
                self._has_keys[slot] = set()
                self.restarts += 1

    async def load_keys(self, model_id: str, key_id: str, data: bytes) -> None:
        slot = self._pick(key_id)
        try:
            await self._run(slot, "load_keys", model_id, key_id, data)
            self._has_keys[slot].add(key_id)
        finally:
            self._busy[slot] -= 1

    async def infer(self, model_id: str, key_id: str, ciphertext: bytes, key_data: bytes) -> tuple[bytes, float]:
        """Evaluate; the serialized keys travel to the worker only when it does not hold them yet."""
        slot = self._pick(key_id)
        try:
            try:
                result = await self._run(slot, "infer", model_id, key_id, ciphertext, None)
            except KeysNotLoaded:
                result = await self._run(slot, "infer", model_id, key_id, ciphertext, key_data)
            self._has_keys[slot].add(key_id)
            return result
        finally:
            self._busy[slot] -= 1

    def forget_keys(self, key_id: str) -> None:
        """Best effort: ask workers to drop deleted keys now instead of waiting for their LRU to push them out."""
        for slot, held in enumerate(self._has_keys):
            if key_id in held:
                held.discard(key_id)
                if self._local is not None:
                    self._local.drop_keys(key_id)
                else:
                    try:
                        self._slots[slot].submit(_call, "drop_keys", key_id)
                    except (BrokenProcessPool, RuntimeError):
                        pass


def default_processes() -> int:
    """One worker process per core, at most 4: each holds the compiled models and its share of clients' keys."""
    return max(1, min(4, os.cpu_count() or 1))
