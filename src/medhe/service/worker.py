"""Where encrypted inference actually runs: compiled models plus a cache of deserialized evaluation keys.

seal-python (and other native backends) hold the GIL for the whole of each call, so evaluating on the web
process's threads stalls health checks and gives no parallelism. ``WorkerPool`` therefore runs ``WorkerState``
in worker *processes* (one single-process executor per slot, so each slot keeps its own keys), or in a thread
pool when ``processes=0`` (cheaper to start; fine for tests and single users). A worker that dies — a
native crash on hostile input — is replaced and the request that killed it gets an error, the server stays up.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from typing import Any

from medhe.errors import MedheError
from medhe.he.scheme import compile_model, load_encrypted_model
from medhe.models.artifact import load_artifact
from medhe.service.catalog import ModelRef
from medhe.service.errors import ServiceError
from medhe.service.keystore import KeyStore
from medhe.service.limits import rules_for


log = logging.getLogger("medhe.service")
REAP_BACKOFF_S = 10.0  # the reaper replaces one slot at most this often (requests that find it broken do at once)
RECYCLE_GROWTH, RECYCLE_SLACK = 1.10, 64 << 20  # a keyless worker above 110 % of its baseline + 64 MiB is replaced


class KeysNotLoaded(MedheError):
    """The worker does not hold these keys (a replaced worker, or its own safety cap evicted them)."""


class WorkerState:
    """Compiled models and deserialized keys of one worker (process or the thread pool)."""

    def __init__(self, refs: list[ModelRef], key_cache_bytes: int):
        self.models = {}
        for ref in refs:
            if ref.encrypted:  # weights exist here only as ciphertexts: the plaintext model is never opened
                self.models[ref.id] = load_encrypted_model(ref.scheme, ref.source)
            else:
                self.models[ref.id] = compile_model(load_artifact(ref.source), ref.scheme, **dict(ref.options))
        self.keys = KeyStore(key_cache_bytes, ttl=None)
        self.baseline = resident_bytes()  # after compiling: what this worker needs without any client's keys

    def specs(self) -> dict[str, dict]:
        return {model_id: model.spec() for model_id, model in self.models.items()}

    def rules(self) -> dict[str, dict | None]:
        """Per model: upload bounds and the memory one loaded key set holds (``limits.rules_for``)."""
        return {model_id: rules_for(model) for model_id, model in self.models.items()}

    def load_keys(self, model_id: str, key_id: str, path: str, size: int, held: int = 0) -> int:
        """Deserialize and validate keys spooled to ``path`` by the web process (``CiphertextError`` if they do not
        fit the model) and cache them; returns how much this process's resident memory grew meanwhile.

        A path, not bytes: 0.5 GB of keys pickled through the worker pipe would be two more copies; here the
        serialized form lives only until the backend has loaded it. ``held``: what the caller accounts for them.
        """
        return self.load_key_bytes(model_id, key_id, read_spooled(path, size), held)

    def load_key_bytes(self, model_id: str, key_id: str, data: bytes, held: int = 0) -> int:
        """``load_keys`` for keys that arrive as bytes (a Ray actor on another machine cannot open the web
        process's spool file); returns the resident memory growth."""
        before = resident_bytes()
        size = len(data)
        try:
            keys = self.models[model_id].load_keys(data)
        finally:
            del data
        self.keys.add(model_id, keys, max(held, size), key_id=key_id)
        return max(0, resident_bytes() - before)

    def infer(self, model_id: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
        """Evaluate with the cached keys; returns the encrypted result and the evaluation time in ms."""
        entry = self.keys.get(key_id)
        if entry is None or entry.model != model_id:
            raise KeysNotLoaded(key_id)
        start = time.perf_counter()
        out = self.models[model_id].infer(entry.value, ciphertext)
        return out, (time.perf_counter() - start) * 1000.0

    def drop_keys(self, key_id: str) -> tuple[int, int, int]:
        """Forget one key set; returns (key sets left, resident bytes now, resident bytes after compiling)."""
        entry = self.keys.remove(key_id)
        del entry
        trim_heap()
        return len(self.keys), resident_bytes(), self.baseline


def read_spooled(path: str, size: int) -> bytes:
    """The evaluation keys the web process spooled to ``path``, checked to be the ``size`` bytes it wrote."""
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) != size:
        raise MedheError(f"spooled evaluation keys are {len(data)} bytes, expected {size} (temporary folder "
                         "full or cleaned?); register the keys again")
    return data


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``): SEAL frees a key set's hundreds of small
    allocations, and glibc otherwise keeps them in its arenas, so the worker's RSS would never come down."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _watch_parent(parent: int) -> None:
    """Exit when the server process is gone (even killed with SIGKILL, which runs no cleanup): a worker holding
    clients' keys must never outlive the server that started it."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


# -- process-side entry points (module level so they pickle by name) ---------------------------------------------
_STATE: WorkerState | None = None
_INIT: tuple | None = None


def _init_process(refs: list[ModelRef], key_cache_bytes: int, threads: int) -> None:
    """Runs in each fresh worker. Compilation is deferred to the first call so its errors reach the parent as
    exceptions (a failing initializer only yields an opaque BrokenProcessPool and a traceback on stderr)."""
    global _INIT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the whole process group: the parent shuts us down
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="medhe-parent-watch").start()
    import torch

    torch.set_num_threads(max(1, threads))
    _INIT = (refs, key_cache_bytes)


def _call(method: str, *args: Any) -> Any:
    global _STATE
    if _STATE is None:
        assert _INIT is not None, "worker process not initialised"
        _STATE = WorkerState(*_INIT)
    return getattr(_STATE, method)(*args)


class SlotGenerations:
    """What every pool (local processes, Ray actors) shares: slots whose ``generation`` is bumped when the process
    or actor behind them is replaced, so a key set placed as ``(slot, generation)`` is known lost afterwards."""

    generation: list[int]
    _slots: list[Any]
    _key_bytes: list[int]
    _lock: threading.Lock

    def holds(self, placement: tuple[int, int]) -> bool:
        """Whether the worker a key set was loaded into (``(slot, generation)`` from ``load_keys``) still runs."""
        slot, generation = placement
        return slot < len(self.generation) and self.generation[slot] == generation

    _counted: dict[str, tuple[int, int, int]]  # key id -> (slot, generation, bytes counted in _key_bytes)

    def _reserve_key_bytes(self, slot: int, generation: int, key_id: str, size: int) -> None:
        """Count a key set in the slot chosen for it, at the choice (call with the lock held), remembering the
        amount: ``_release_key_bytes`` takes back exactly that.

        At the choice, not after the load: 32 clients registering together would otherwise all see the same
        counts and pile onto one slot while the first loads are still running. Exactly that amount: taking back
        the server's accounted size instead (which includes the measured memory growth) drove a slot below zero
        whenever the growth exceeded the estimate, and placement, fewest key bytes first, then sent every new key
        set to that slot: one worker's throughput for the whole server. And the estimate or the upload, not the
        growth: growth is noisy (a worker's first key set grows it most, later ones reuse freed memory)."""
        if slot < len(self._slots) and self.generation[slot] == generation:
            self._key_bytes[slot] += size
            self._counted[key_id] = (slot, generation, size)

    def _release_key_bytes(self, slot: int, generation: int, key_id: str) -> Any:
        """Uncount a dropped key set; the slot's worker to free it in, or None when that worker was replaced."""
        with self._lock:
            counted = self._counted.pop(key_id, None)
            if slot >= len(self._slots) or self.generation[slot] != generation:
                return None
            if counted is not None and counted[:2] == (slot, generation):
                self._key_bytes[slot] -= counted[2]
            return self._slots[slot]

    def _forget_slot_keys(self, slot: int) -> None:
        """A replaced worker holds nothing: zero its count (call with the lock held)."""
        self._key_bytes[slot] = 0
        self._counted = {k: v for k, v in self._counted.items() if v[0] != slot}


class WorkerPool(SlotGenerations):
    """Worker slots with key affinity: a client's keys are deserialized in one slot and its requests go there.

    Deserializing evaluation keys costs several inferences' worth of time and their in-memory form is larger than
    the upload, so each key set lives in exactly one worker (chosen at registration: the one holding the fewest
    key bytes, then the least busy). The web process keeps only metadata (``KeyStore`` entries whose value is the
    slot), so memory is bounded by ``--max-key-bytes`` once, not once per worker.
    """

    def __init__(self, refs: list[ModelRef], processes: int = 0, threads: int = 1,
                 key_cache_bytes: int = 1 << 32, on_replace=None):
        self.refs = list(refs)
        self.processes = max(0, int(processes))
        self.threads = max(1, int(threads))
        self.key_cache_bytes = key_cache_bytes
        self._slots: list[Executor] = []
        self._busy: list[int] = []
        self._key_bytes: list[int] = []
        self._counted = {}
        self.generation: list[int] = []  # bumped when a slot's process is replaced (its keys are gone)
        self._specs: dict[str, dict] = {}
        self._verified: list[bool] = []  # a replacement process must compile exactly what clients were told
        self._local: WorkerState | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self.rules: dict[str, dict | None] = {}
        self._on_replace = on_replace  # (slot, old generation): the keys that lived in that worker are gone
        self._replaced_at: dict[int, float] = {}

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def live(self) -> int:
        """Slots that can take work now (a replaced process compiles on its first call, so all of them)."""
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
                self.close()
                raise MedheError("workers compiled different parameters for the same model; compilation must be "
                                 "deterministic (report this as a bug)")
            spec = specs[0]
            self.rules = self._slots[0].submit(_call, "rules").result()
        else:
            self._local = WorkerState(self.refs, self.key_cache_bytes)
            self._slots = [ThreadPoolExecutor(self.threads, thread_name_prefix="medhe-infer")]
            spec = self._local.specs()
            self.rules = self._local.rules()
        n = len(self._slots)
        self._busy, self._key_bytes, self.generation = [0] * n, [0] * n, [0] * n
        self._verified = [True] * n
        self._specs = spec
        return spec

    def close(self, grace: float = 5.0) -> None:
        """Stop every worker process and wait for it: none may outlive the server (issue #16, fault 1).

        Workers get ``grace`` seconds to finish their current call, then are terminated, then killed."""
        slots, self._slots = self._slots, []
        procs = [p for slot in slots for p in list((getattr(slot, "_processes", None) or {}).values())]
        for slot in slots:
            slot.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)

    def reap(self) -> int:
        """Replace every worker process that died since the last look (e.g. killed by the OOM killer) without
        waiting for a request to hit it, so its keys leave the accounting at once; returns how many."""
        if self._local is not None:
            return 0
        dead = []
        now = time.monotonic()
        with self._lock:
            for i, slot in enumerate(self._slots):
                if now - self._replaced_at.get(i, -REAP_BACKOFF_S) < REAP_BACKOFF_S:
                    continue  # a replacement that keeps dying while compiling: retry at this pace, not every tick
                procs = list((getattr(slot, "_processes", None) or {}).values())
                if getattr(slot, "_broken", False) or any(p.exitcode is not None for p in procs):
                    dead.append((i, self.generation[i]))
        for slot, generation in dead:
            self._replace(slot, generation)
        return len(dead)

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
            if self.generation[slot] != generation or slot >= len(self._slots):
                return  # another request already replaced it (or the pool is closing)
            old = self._slots[slot]
            new = self._slots[slot] = self._new_process_slot()
            self.generation[slot] += 1
            self._forget_slot_keys(slot)
            self._verified[slot] = False
            self.restarts += 1
            self._replaced_at[slot] = time.monotonic()
            new_generation = self.generation[slot]
        warm = new.submit(_call, "specs")  # compile now, not in the next client's request
        warm.add_done_callback(lambda f: self._warmed(slot, new_generation, f))
        procs = list((getattr(old, "_processes", None) or {}).values())
        old.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # a worker that is merely broken, not dead, must not linger with its keys
            if proc.is_alive():
                proc.kill()
        if self._on_replace is not None:
            self._on_replace(slot, generation)

    def _warmed(self, slot: int, generation: int, future) -> None:
        try:
            same = future.result() == self._specs
        except BaseException:
            return  # the first request will try again and report it
        with self._lock:
            if same and slot < len(self._slots) and self.generation[slot] == generation:
                self._verified[slot] = True

    async def load_keys(self, model_id: str, key_id: str, path: str, size: int, held: int = 0
                        ) -> tuple[tuple[int, int], int]:
        """Validate and deserialize the keys in file ``path`` (``size`` bytes) in the slot with the least key bytes;
        returns ((slot, generation), growth of that worker's resident memory while loading). The caller deletes
        the file afterwards. ``held``: the memory the caller accounts for the loaded keys."""
        with self._lock:
            slot = min(range(len(self._slots)), key=lambda i: (self._key_bytes[i], self._busy[i]))
            generation = self.generation[slot]
            self._reserve_key_bytes(slot, generation, key_id, max(held, size))
        try:
            grown = int(await self._run(slot, "load_keys", model_id, key_id, path, size, held) or 0)
        except BaseException:
            self._release_key_bytes(slot, generation, key_id)
            raise
        return (slot, generation), grown

    async def infer(self, slot: int, model_id: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
        try:
            return await self._run(slot, "infer", model_id, key_id, ciphertext)
        except KeysNotLoaded:
            raise ServiceError(404, "unknown_key", "the server no longer holds these keys (worker restarted "
                                                   "or memory cap reached); register your keys again") from None

    def drop_keys(self, slot: int, generation: int, key_id: str) -> None:
        """Free keys in their worker now (fire and forget); a replaced worker has lost them already."""
        executor = self._release_key_bytes(slot, generation, key_id)
        if executor is None:
            return
        if self._local is not None:
            self._local.drop_keys(key_id)
            return
        try:
            future = executor.submit(_call, "drop_keys", key_id)
        except (BrokenProcessPool, RuntimeError):
            return
        future.add_done_callback(lambda f: self._maybe_recycle(slot, generation, f))

    def _maybe_recycle(self, slot: int, generation: int, future) -> None:
        """Replace a worker that holds no keys any more but whose memory stayed high.

        SEAL allocates key material from its global memory pool, which keeps every block for reuse and never
        returns it to the OS (seal-python offers no other pool to load keys into), so a worker that once held
        30 key sets keeps their ~2.5 GB after all are deleted. A process that holds nothing is cheap to replace:
        the replacement compiles the models again (seconds) and starts at its baseline."""
        try:
            left, rss, baseline = future.result()
        except BaseException:
            return
        if left or not baseline or rss <= baseline * RECYCLE_GROWTH + RECYCLE_SLACK:
            return
        with self._lock:
            if (slot >= len(self._slots) or self.generation[slot] != generation or self._key_bytes[slot] > 0
                    or self._busy[slot] > 0):
                return
        log.info("medhe serve: recycling worker %d (no keys left, %d MiB resident vs %d MiB after compiling)",
                 slot, rss >> 20, baseline >> 20)
        self._replace(slot, generation)


def default_processes() -> int:
    """One worker process per core, at most 4: each holds the compiled models and its share of clients' keys."""
    return max(1, min(4, os.cpu_count() or 1))
