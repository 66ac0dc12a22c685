"""Where encrypted inference actually runs: compiled models plus a cache of deserialized evaluation keys.

seal-python (and other native backends) hold the GIL for the whole of each call, so evaluating on the web
process's threads stalls health checks and gives no parallelism. ``WorkerPool`` therefore runs ``WorkerState``
in worker *processes* (one single-process executor per slot, so each slot keeps its own keys), or in a thread
pool when ``processes=0`` (cheaper to start; fine for tests and single users). A worker that dies — a
native crash on hostile input — is replaced and the request that killed it gets an error, the server stays up.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
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
    """The worker does not hold these keys (a replaced worker, or its own safety cap evicted them)."""


class WorkerState:
    """Compiled models and deserialized keys of one worker (process or the thread pool)."""

    def __init__(self, refs: list[ModelRef], key_cache_bytes: int):
        self.models = {}
        for ref in refs:
            if ref.encrypted:  # weights exist here only as ciphertexts: the plaintext model is never opened
                from medhe.he.ckks.encrypted.model import load_encrypted_model

                self.models[ref.id] = load_encrypted_model(ref.source)
            else:
                self.models[ref.id] = compile_model(load_artifact(ref.source), ref.scheme, **dict(ref.options))
        self.keys = KeyStore(key_cache_bytes, ttl=None)

    def specs(self) -> dict[str, dict]:
        return {model_id: model.spec() for model_id, model in self.models.items()}

    def load_keys(self, model_id: str, key_id: str, path: str, size: int) -> None:
        """Deserialize and validate keys spooled to ``path`` by the web process (``CiphertextError`` if they do not
        fit the model) and cache them. A path, not bytes: 0.5 GB of keys pickled through the worker pipe would be
        two more copies; here the serialized form lives only until the backend has loaded it."""
        with open(path, "rb") as fh:
            data = fh.read()
        if len(data) != size:
            raise MedheError(f"spooled evaluation keys are {len(data)} bytes, expected {size} (temporary folder "
                             "full or cleaned?); register the keys again")
        keys = self.models[model_id].load_keys(data)
        del data
        self.keys.add(model_id, keys, size, key_id=key_id)

    def infer(self, model_id: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
        """Evaluate with the cached keys; returns the encrypted result and the evaluation time in ms."""
        entry = self.keys.get(key_id)
        if entry is None or entry.model != model_id:
            raise KeysNotLoaded(key_id)
        start = time.perf_counter()
        out = self.models[model_id].infer(entry.value, ciphertext)
        return out, (time.perf_counter() - start) * 1000.0

    def drop_keys(self, key_id: str) -> None:
        self.keys.remove(key_id)


# -- process-side entry points (module level so they pickle by name) ---------------------------------------------
_STATE: WorkerState | None = None
_INIT: tuple | None = None


def _init_process(refs: list[ModelRef], key_cache_bytes: int, threads: int) -> None:
    """Runs in each fresh worker. Compilation is deferred to the first call so its errors reach the parent as
    exceptions (a failing initializer only yields an opaque BrokenProcessPool and a traceback on stderr)."""
    global _INIT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the whole process group: the parent shuts us down
    import torch

    torch.set_num_threads(max(1, threads))
    _INIT = (refs, key_cache_bytes)


def _call(method: str, *args: Any) -> Any:
    global _STATE
    if _STATE is None:
        assert _INIT is not None, "worker process not initialised"
        _STATE = WorkerState(*_INIT)
    return getattr(_STATE, method)(*args)


class WorkerPool:
    """Worker slots with key affinity: a client's keys are deserialized in one slot and its requests go there.

    Deserializing evaluation keys costs several inferences' worth of time and their in-memory form is larger than
    the upload, so each key set lives in exactly one worker (chosen at registration: the one holding the fewest
    key bytes, then the least busy). The web process keeps only metadata (``KeyStore`` entries whose value is the
    slot), so memory is bounded by ``--max-key-bytes`` once, not once per worker.
    """

    def __init__(self, refs: list[ModelRef], processes: int = 0, threads: int = 1,
                 key_cache_bytes: int = 1 << 32):
        self.refs = list(refs)
        self.processes = max(0, int(processes))
        self.threads = max(1, int(threads))
        self.key_cache_bytes = key_cache_bytes
        self._slots: list[Executor] = []
        self._busy: list[int] = []
        self._key_bytes: list[int] = []
        self.generation: list[int] = []  # bumped when a slot's process is replaced (its keys are gone)
        self._specs: dict[str, dict] = {}
        self._verified: list[bool] = []  # a replacement process must compile exactly what clients were told
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
            futures = [slot.submit(_call, "specs") for slot in self._slots]  # compile in parallel
            try:
                specs = [f.result() for f in futures]
            except BrokenProcessPool:
                self.close()
                raise MedheError("a worker process died while compiling the models (out of memory?); try "
                                 "fewer --workers") from None
            except BaseException:
                self.close()
                raise
            if any(s != specs[0] for s in specs[1:]):
                raise MedheError("workers compiled different parameters for the same model; compilation must be "
                                 "deterministic (report this as a bug)")
            spec = specs[0]
        else:
            self._local = WorkerState(self.refs, self.key_cache_bytes)
            self._slots = [ThreadPoolExecutor(self.threads, thread_name_prefix="medhe-infer")]
            spec = self._local.specs()
        n = len(self._slots)
        self._busy, self._key_bytes, self.generation = [0] * n, [0] * n, [0] * n
        self._verified = [True] * n
        self._specs = spec
        return spec

    def close(self) -> None:
        for slot in self._slots:
            slot.shutdown(wait=False, cancel_futures=True)
        self._slots = []

    # -- dispatch --------------------------------------------------------------------------------------------------
    async def _run(self, slot: int, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._busy[slot] += 1
            executor, generation = self._slots[slot], self.generation[slot]
        try:
            if self._local is not None:
                return await loop.run_in_executor(executor, getattr(self._local, method), *args)
            if not self._verified[slot]:
                await self._verify(slot, executor)
            return await asyncio.wrap_future(executor.submit(_call, method, *args))
        except BrokenProcessPool:
            self._replace(slot, generation)
            raise ServiceError(500, "worker_crashed",
                               "the inference worker crashed on this request and was restarted; register "
                               "your keys again and check the ciphertext was made for this model") from None
        finally:
            with self._lock:
                self._busy[slot] -= 1

    async def _verify(self, slot: int, executor: Executor) -> None:
        """A replacement worker compiles on first use; refuse it if that gives other parameters than announced
        (e.g. medhe was upgraded on disk under a running server): clients' keys would not fit."""
        specs = await asyncio.wrap_future(executor.submit(_call, "specs"))
        if specs != self._specs:
            raise ServiceError(503, "worker_mismatch",
                               "a restarted inference worker compiled different parameters than this server "
                               "announced (was medhe changed on disk?); the operator must restart medhe serve")
        self._verified[slot] = True

    def _replace(self, slot: int, generation: int) -> None:
        with self._lock:
            if self.generation[slot] != generation:
                return  # another request already replaced it
            self._slots[slot].shutdown(wait=False, cancel_futures=True)
            self._slots[slot] = self._new_process_slot()
            self.generation[slot] += 1
            self._key_bytes[slot] = 0
            self._verified[slot] = False
            self.restarts += 1

    async def load_keys(self, model_id: str, key_id: str, path: str, size: int) -> tuple[int, int]:
        """Validate and deserialize the keys in file ``path`` (``size`` bytes) in the slot with the least key bytes;
        returns (slot, generation). The caller deletes the file afterwards."""
        with self._lock:
            slot = min(range(len(self._slots)), key=lambda i: (self._key_bytes[i], self._busy[i]))
            generation = self.generation[slot]
        await self._run(slot, "load_keys", model_id, key_id, path, size)
        with self._lock:
            self._key_bytes[slot] += size
        return slot, generation

    async def infer(self, slot: int, model_id: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
        try:
            return await self._run(slot, "infer", model_id, key_id, ciphertext)
        except KeysNotLoaded:
            raise ServiceError(404, "unknown_key", "the server no longer holds these keys (worker restarted "
                                                   "or memory cap reached); register your keys again") from None

    def drop_keys(self, slot: int, generation: int, key_id: str, size: int) -> None:
        """Free keys in their worker now (fire and forget); a replaced worker has lost them already."""
        with self._lock:
            if self.generation[slot] != generation:
                return
            self._key_bytes[slot] -= size
            executor = self._slots[slot]
        if self._local is not None:
            self._local.drop_keys(key_id)
            return
        try:
            executor.submit(_call, "drop_keys", key_id)
        except (BrokenProcessPool, RuntimeError):
            pass


def default_processes() -> int:
    """One worker process per core, at most 4: each holds the compiled models and its share of clients' keys."""
    return max(1, min(4, os.cpu_count() or 1))
