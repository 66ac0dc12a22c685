"""Inference in Ray actors across a cluster: the ``WorkerPool`` interface (``medhe serve --ray``).

Each actor is what a worker process is for plain ``medhe serve``: a ``WorkerState`` (the compiled models and a
cache of deserialized evaluation keys) reserving one CPU of the cluster. A key set lives in exactly one actor,
chosen at registration like a worker slot (fewest key bytes, then least busy); the web process keeps only its
placement ``(slot, generation)``. When an actor or its node is lost (Ray reports the actor unavailable or dead,
or the node leaves the cluster), the slot's generation is bumped, the server forgets the keys that lived there,
the request gets ``worker_crashed`` and the SDK re-registers (into a live actor) and retries, exactly as after a
worker crash. A replacement actor is requested at once; Ray places it when some node has a free CPU, and it takes
key sets only once it has compiled the same parameters the server announced.

By default every actor compiles and holds every served model. ``replicas`` (``--ray-replicas MODEL=N``) gives a
listed model N dedicated actors that hold only it (a big CKKS model's key sets then never crowd out small models'
actors, and each actor compiles and keeps in memory one model instead of all); the unlisted models share the
default actors. A key set goes to an actor holding its model, and a replacement holds what the lost actor held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

from medhe.errors import MedheError
from medhe.service.catalog import ModelRef
from medhe.service.errors import ServiceError
from medhe.service.raycluster import alive_nodes, inline_env, require_ray
from medhe.service.worker import KeysNotLoaded, SlotGenerations, WorkerState, read_spooled

log = logging.getLogger("medhe.service")
REAP_EVERY_S = 1.0  # ask the cluster for its live nodes at most this often (a GCS round trip)
START_TIMEOUT_S = 600.0  # compiling the models in a fresh actor (seconds; minutes for TFHE models)
# Ray starts worker processes at niceness 15 so its raylet stays responsive; an actor here *is* the inference
# worker, and at 15 it loses every contended core to the HTTP front, clients and Ray's own daemons on the same
# machine (measured: eval p50 56 ms against 31 ms for a plain worker on the same 2 cores). Plain `medhe serve`
# workers run at 0, so actors do too (a worker-level setting: `RAY_worker_niceness` in the actor's environment).
ACTOR_ENV = {"RAY_worker_niceness": "0"}


class KeyActor:
    """The body of one Ray actor: a ``WorkerState`` plus batch-mode servers compiled on first use."""

    def __init__(self, refs: list[ModelRef], key_cache_bytes: int, threads: int = 1, batch: bool = False):
        import torch

        torch.set_num_threads(max(1, threads))
        self.threads = max(1, threads)
        self.refs = {ref.id: ref for ref in refs}
        self.batch: dict[str, Any] = {}
        self.batch_mode = batch  # medhe score: only the batch plans are compiled (no single-image keys held)
        self.state = None if batch else WorkerState(refs, key_cache_bytes)
        if batch:
            for ref in refs:
                self.batch_server(ref.id)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def specs(self) -> dict[str, dict]:
        if self.batch_mode:
            return {model_id: server.spec() for model_id, server in self.batch.items()}
        return self.state.specs()

    def rules(self) -> dict[str, dict | None]:
        if self.batch_mode:
            return {model_id: None for model_id in self.batch}
        return self.state.rules()

    def load_key_bytes(self, model_id: str, key_id: str, data: bytes, held: int) -> int:
        return self.state.load_key_bytes(model_id, key_id, data, held)

    def infer(self, model_id: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
        return self.state.infer(model_id, key_id, ciphertext)

    def drop_keys(self, key_id: str) -> tuple[int, int, int]:
        return self.state.drop_keys(key_id)

    def batch_server(self, model_id: str) -> Any:
        server = self.batch.get(model_id)
        if server is None:
            from medhe.he.scheme import compile_batch
            from medhe.models.artifact import load_artifact

            ref = self.refs[model_id]
            server = self.batch[model_id] = compile_batch(load_artifact(ref.source), ref.scheme, threads=self.threads)
        return server

    def batch_spec(self, model_id: str) -> dict:
        return self.batch_server(model_id).spec()

    def infer_batch(self, model_id: str, keys: bytes, data: bytes) -> tuple[bytes, float]:
        """One encrypted batch (batch mode: one image per slot) with the client's relinearization keys."""
        server = self.batch_server(model_id)
        start = time.perf_counter()
        out = server.infer_batch(server.load_keys(keys), data)
        return out, (time.perf_counter() - start) * 1000.0


def actor_errors() -> tuple[type, ...]:
    """Ray's ways of saying an actor (or its node) is gone or cannot be reached. ``OutOfMemoryError``: Ray's memory
    monitor killed the actor's process because its node ran short of memory (by default above 95 % used, whoever
    used it): the actor and its keys are gone as after a crash."""
    from ray import exceptions as rx

    return tuple(getattr(rx, name) for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                "NodeDiedError", "WorkerCrashedError", "ObjectLostError",
                                                "OwnerDiedError", "OutOfMemoryError") if hasattr(rx, name))


class RayPool(SlotGenerations):
    """Ray actors with key affinity, behind the same interface as ``WorkerPool`` (see ``server.create_app``).

    ``actors``: how many (default: one per free CPU of the cluster when it starts); ``per_node``: instead, that many
    on every node, also on nodes that join later (soft node affinity: a replacement may land elsewhere). ``cpus``: CPUs each
    actor reserves (its models' evaluation uses that many threads). ``batch``: the actors compile each model's
    batch plan (one image per slot) instead of the single-image model, for ``medhe score``. ``replicas``: model id
    -> N dedicated actors holding only that model; ``actors``/``per_node``/the free-CPU rule then place the
    default actors, which hold only the unlisted models (none when every model is listed).
    """

    def __init__(self, refs: list[ModelRef], key_cache_bytes: int = 1 << 32, on_replace: Callable | None = None,
                 actors: int | None = None, per_node: int | None = None, cpus: int = 1,
                 start_timeout: float = START_TIMEOUT_S, batch: bool = False,
                 replicas: dict[str, int] | None = None):
        self.refs = list(refs)
        self.replicas = check_replicas(replicas or {}, [ref.id for ref in self.refs], actors, per_node)
        self.shared_models = tuple(ref.id for ref in self.refs if ref.id not in self.replicas)  # default actors'
        self.batch = batch  # actors compile batch plans instead (medhe score)
        self.key_cache_bytes = key_cache_bytes
        self.actors, self.per_node, self.cpus = actors, per_node, max(1, int(cpus))
        self.start_timeout = start_timeout
        self._on_replace = on_replace
        self._slots: list[Any] = []  # actor handles
        self._nodes: list[str | None] = []  # node id of each slot's actor (None: not placed yet)
        self._ready: list[bool] = []  # compiled and verified: may take new key sets
        self._warm: list[Any] = []  # a replacement's pending (specs, node) object refs, or None
        self._busy: list[int] = []
        self._key_bytes: list[int] = []
        self._counted = {}
        self._affinity: list[str | None] = []
        self._models: list[tuple[str, ...]] = []  # model ids each slot's actor holds (a replacement: the same)
        self.generation: list[int] = []
        self._specs: dict[str, dict] = {}
        self.rules: dict[str, dict | None] = {}
        self.restarts = 0
        self._lock = threading.Lock()
        self._remote = None
        self._checked = 0.0  # when reap last asked the cluster which nodes are alive

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def live(self) -> int:
        """Actors compiled and verified, able to take key sets now (``/v1/ready`` reports these as workers)."""
        self._admit()
        return sum(self._ready)

    def live_by_model(self) -> dict[str, int]:
        """Model id -> actors holding it that can take key sets now (what ``--ray-replicas`` placed)."""
        self._admit()
        with self._lock:
            return {ref.id: sum(1 for i in range(len(self._slots)) if self._ready[i] and ref.id in self._models[i])
                    for ref in self.refs}

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _actor_class(self) -> Any:
        if self._remote is None:
            ray = require_ray()
            self._remote = ray.remote(num_cpus=self.cpus, max_restarts=0, max_task_retries=0)(KeyActor)
        return self._remote

    def _new_actor(self, node: str | None, models: tuple[str, ...]) -> Any:
        options: dict[str, Any] = {}
        if node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        else:
            options["scheduling_strategy"] = "SPREAD"
        options["runtime_env"] = {"env_vars": {**ACTOR_ENV, **inline_env()}}  # results inline too
        refs = [ref for ref in self.refs if ref.id in models]
        return self._actor_class().options(**options).remote(refs, self.key_cache_bytes, self.cpus, self.batch)

    def _placement_plan(self) -> list[tuple[str | None, tuple[str, ...]]]:
        """(node affinity, models held) of every actor to start: the dedicated replicas first, then the default
        actors for the unlisted models."""
        ray = require_ray()
        plan: list[tuple[str | None, tuple[str, ...]]] = [(None, (model_id,)) for model_id, n in
                                                          self.replicas.items() for _ in range(n)]
        shared = self.shared_models
        if not shared:
            return plan
        if self.per_node:
            return plan + [(node, shared) for node in sorted(alive_nodes()) for _ in range(self.per_node)]
        if self.actors:
            return plan + [(None, shared)] * self.actors
        free = int(ray.available_resources().get("CPU", 0)) // self.cpus  # CPUs other jobs hold are not ours
        cpus = free - len(plan)  # the dedicated replicas take theirs first
        if cpus < 1:
            if plan:
                raise MedheError(f"the Ray cluster has {free} free CPU slot(s) of {self.cpus} CPU(s), all taken by the "
                                 f"{len(plan)} actor(s) of --ray-replicas, none left for "
                                 f"{', '.join(shared)}: add nodes, list those models in --ray-replicas too, or ask "
                                 "for fewer replicas")
            raise MedheError(f"the Ray cluster has no free CPU for an actor of {self.cpus} CPU(s); add nodes or "
                             "lower --ray-cpus")
        return plan + [(None, shared)] * cpus

    def start(self) -> dict[str, dict]:
        """Create the actors, compile every model in each (in parallel, blocking) and return the specs."""
        ray = require_ray()
        plan = self._placement_plan()
        self._slots = [self._new_actor(node, models) for node, models in plan]
        self._affinity = [node for node, _ in plan]
        self._models = [models for _, models in plan]
        n = len(self._slots)
        specs_refs = [a.specs.remote() for a in self._slots]
        node_refs = [a.node.remote() for a in self._slots]
        firsts = [self._models.index(models) for models in dict.fromkeys(self._models)]  # first actor per model set
        try:
            specs = ray.get(specs_refs, timeout=self.start_timeout)
            nodes = ray.get(node_refs, timeout=60)
            rules = ray.get([self._slots[i].rules.remote() for i in firsts], timeout=60)  # one actor per model set
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise MedheError(f"{n} Ray actor(s) of {self.cpus} CPU(s) were not all placed and compiled within "
                             f"{self.start_timeout:.0f} s: the cluster has too few free CPUs (see `ray status`); "
                             "ask for fewer with --ray-actors or --ray-replicas") from None
        except actor_errors() as exc:
            self.close()
            raise MedheError(f"a Ray actor died while compiling the models ({type(exc).__name__}; out of memory?): "
                             "see the Ray logs, or ask for fewer with --ray-actors") from None
        except BaseException as exc:
            self.close()
            cause = getattr(exc, "cause", None)  # RayTaskError: what compiling raised in the actor (one line)
            if isinstance(cause, MedheError):
                raise cause from None
            raise
        merged: dict[str, dict] = {}
        for held, got in zip(self._models, specs):
            if sorted(got) != sorted(held):  # what each actor reports it compiled, not what it was asked to
                self.close()
                raise MedheError(f"a Ray actor compiled {sorted(got)} instead of {sorted(held)} (different medhe "
                                 "versions on the nodes?); install the same medhe everywhere")
            for model_id, spec in got.items():
                if merged.setdefault(model_id, spec) != spec:
                    self.close()
                    raise MedheError("Ray actors compiled different parameters for the same model (different "
                                     "medhe versions on the nodes?); install the same medhe everywhere")
        self._specs = {ref.id: merged[ref.id] for ref in self.refs}
        self.rules = {ref.id: r[ref.id] for r in rules for ref in self.refs if ref.id in r}
        self._nodes = list(nodes)
        self._ready, self._warm = [True] * n, [None] * n
        self._busy, self._key_bytes, self.generation = [0] * n, [0] * n, [0] * n
        return self._specs

    def close(self, grace: float = 0.0) -> None:
        """Kill every actor this pool created (their keys go with them); the cluster itself stays up."""
        slots, self._slots = self._slots, []
        self._ready = [False] * len(self._ready)
        self._warm = [None] * len(self._warm)
        try:
            ray = require_ray()
            for actor in slots:
                ray.kill(actor, no_restart=True)
        except Exception:  # the cluster may be gone already: nothing left to free
            pass

    def reap(self) -> int:
        """Notice lost nodes without waiting for a request (their keys leave the accounting at once), and admit
        replacements that have compiled; returns how many slots were replaced."""
        if not self._slots:
            return 0
        if time.monotonic() - self._checked < REAP_EVERY_S:
            self._admit()
            return 0
        self._checked = time.monotonic()
        try:
            nodes = alive_nodes()
        except Exception:
            return 0
        dead = []
        with self._lock:
            for i in range(len(self._slots)):
                if self._ready[i] and self._nodes[i] is not None and self._nodes[i] not in nodes:
                    dead.append((i, self.generation[i]))
        for slot, generation in dead:
            self._replace(slot, generation, "its node left the cluster")
        if self.per_node and self.shared_models:
            self._grow(nodes)
        self._admit()
        return len(dead)

    def _grow(self, nodes: dict[str, dict]) -> None:
        """``per_node`` mode: give a node that joined the cluster since the start (by hand, ``ray up``'s or
        KubeRay's autoscaler) its own actors; they take key sets once compiled and verified."""
        with self._lock:
            new = [node for node in sorted(nodes) if node not in self._affinity]
            for node in new:
                for _ in range(self.per_node):
                    actor = self._new_actor(node, self.shared_models)
                    self._slots.append(actor)
                    self._affinity.append(node)
                    self._models.append(self.shared_models)
                    self._nodes.append(None)
                    self._ready.append(False)
                    self._busy.append(0)
                    self._key_bytes.append(0)
                    self.generation.append(0)
                    self._warm.append((0, actor.specs.remote(), actor.node.remote()))
        for node in new:
            log.info("medhe serve --ray: node %s joined; starting %d actor(s) there", node[:12], self.per_node)

    def _admit(self) -> None:
        """Mark replacements ready once they compiled what the server announced."""
        ray = require_ray()
        for i in range(len(self._warm)):
            pending = self._warm[i]
            if pending is None:
                continue
            done, _ = ray.wait(list(pending[1:]), num_returns=2, timeout=0)
            if len(done) < 2:
                continue
            generation = pending[0]
            try:
                specs, node = ray.get(list(pending[1:]))
            except actor_errors():
                with self._lock:
                    if self.generation[i] == generation:
                        self._warm[i] = None
                self._replace(i, generation, "its replacement died while compiling")
                continue
            with self._lock:
                if self.generation[i] != generation:
                    continue
                self._warm[i] = None
                if specs != {model_id: self._specs[model_id] for model_id in self._models[i]}:
                    log.error("medhe serve --ray: a replacement actor compiled other parameters than announced "
                              "(different medhe on that node?); slot %d stays out of service", i)
                    continue
                self._nodes[i], self._ready[i] = node, True
            log.info("medhe serve --ray: slot %d is back on node %s", i, node[:12])

    def _replace(self, slot: int, generation: int, why: str) -> None:
        with self._lock:
            if slot >= len(self._slots) or self.generation[slot] != generation:
                return  # already replaced by another request (or closing)
            old = self._slots[slot]
            new = self._slots[slot] = self._new_actor(self._affinity[slot], self._models[slot])
            self.generation[slot] += 1
            self._ready[slot], self._nodes[slot] = False, None
            self._forget_slot_keys(slot)
            self.restarts += 1
            self._warm[slot] = (self.generation[slot], new.specs.remote(), new.node.remote())
        log.warning("medhe serve --ray: actor %d lost (%s); its keys are forgotten, a replacement is requested",
                    slot, why)
        try:
            require_ray().kill(old, no_restart=True)  # a merely unreachable actor must not keep clients' keys
        except Exception:
            pass
        if self._on_replace is not None:
            self._on_replace(slot, generation)

    # -- dispatch --------------------------------------------------------------------------------------------------
    async def _run(self, slot: int, method: str, *args: Any) -> Any:
        with self._lock:
            actor, generation = self._slots[slot], self.generation[slot]
            self._busy[slot] += 1
        try:
            return await getattr(actor, method).remote(*args)
        except actor_errors() as exc:
            self._replace(slot, generation, type(exc).__name__)
            raise ServiceError(500, "worker_crashed",
                               "the Ray actor holding your keys was lost (its node failed or left the cluster); "
                               "register your keys again and retry") from None
        except Exception as exc:
            cause = getattr(exc, "cause", None)  # RayTaskError: re-raise what the actor raised (422s, unknown key)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        finally:
            with self._lock:
                self._busy[slot] -= 1

    def _pick(self, model_id: str, key_id: str | None = None, size: int = 0) -> tuple[int, int]:
        """The live actor holding ``model_id`` with the fewest key bytes, then the least busy; with ``key_id``,
        ``size`` key bytes are counted there at once (see ``_reserve_key_bytes``)."""
        self._admit()
        with self._lock:
            ready = [i for i in range(len(self._slots)) if self._ready[i] and model_id in self._models[i]]
            if not ready:
                raise ServiceError(503, "no_workers", f"no Ray actor holding {model_id} is available (nodes lost, "
                                                      "replacements not placed yet); retry shortly or add nodes "
                                                      "to the cluster")
            slot = min(ready, key=lambda i: (self._key_bytes[i], self._busy[i]))
            if key_id is not None:
                self._reserve_key_bytes(slot, self.generation[slot], key_id, size)
            return slot, self.generation[slot]

    async def load_keys(self, model_id: str, key_id: str, path: str, size: int, held: int = 0
                        ) -> tuple[tuple[int, int], int]:
        """Load the spooled keys into the actor with the fewest key bytes; the bytes travel through Ray's object
        store (the actor may be on another machine). Returns ((slot, generation), memory growth there)."""
        data = await asyncio.get_running_loop().run_in_executor(None, read_spooled, path, size)
        return await self.load_key_bytes(model_id, key_id, data, held)

    async def load_key_bytes(self, model_id: str, key_id: str, data: bytes, held: int = 0,
                             slot: int | None = None) -> tuple[tuple[int, int], int]:
        """Load keys given as bytes into ``slot`` (default: the live actor holding the model with the fewest key
        bytes). Without a given slot, an actor found lost while loading costs another try on the next live one:
        when a node dies, its other actors are only noticed one by one, and a client re-registering must not land
        on them."""
        ref = require_ray().put(data)  # once in the object store, however many tries
        tries = 1 if slot is not None else max(1, self.live_by_model().get(model_id, 0))
        counted = max(held, len(data))
        for attempt in range(tries):
            if slot is None:
                pick, generation = self._pick(model_id, key_id, counted)
            else:
                with self._lock:
                    pick, generation = slot, self.generation[slot]
                    self._reserve_key_bytes(pick, generation, key_id, counted)
            try:
                grown = await self._run(pick, "load_key_bytes", model_id, key_id, ref, held)
                break
            except BaseException as exc:
                self._release_key_bytes(pick, generation, key_id)
                if not isinstance(exc, ServiceError) or exc.code != "worker_crashed" or attempt + 1 >= tries:
                    raise
        return (pick, generation), int(grown or 0)

    async def infer(self, slot: int, model_id: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
        try:
            return await self._run(slot, "infer", model_id, key_id, ciphertext)
        except KeysNotLoaded:
            raise ServiceError(404, "unknown_key", "the server no longer holds these keys (actor replaced or "
                                                   "memory cap reached); register your keys again") from None

    async def infer_batch(self, slot: int, model_id: str, keys: Any, data: bytes) -> tuple[bytes, float]:
        return await self._run(slot, "infer_batch", model_id, keys, data)

    async def run_batch(self, model_id: str, keys: bytes, data: bytes) -> tuple[bytes, float]:
        """One encrypted batch (HTTP batch mode) in the least busy live actor holding the model, which needs no
        registered state: the relinearization keys travel with it. An actor lost meanwhile costs one more try on
        another actor."""
        ray = require_ray()
        keys_ref, data_ref = ray.put(keys), ray.put(data)  # once in the object store, whichever actor reads them
        for attempt in (0, 1):
            slot, _ = self._pick(model_id)
            try:
                return await self._run(slot, "infer_batch", model_id, keys_ref, data_ref)
            except ServiceError as exc:
                if exc.code != "worker_crashed" or attempt:
                    raise
        raise AssertionError("unreachable")

    async def call(self, slot: int, method: str, *args: Any) -> Any:
        return await self._run(slot, method, *args)

    def ready_slots(self) -> list[tuple[int, int]]:
        self._admit()
        with self._lock:
            return [(i, self.generation[i]) for i in range(len(self._slots)) if self._ready[i]]

    def drop_keys(self, slot: int, generation: int, key_id: str) -> None:
        """Free keys in their actor now (fire and forget); a replaced actor has lost them already."""
        actor = self._release_key_bytes(slot, generation, key_id)
        if actor is None:
            return
        try:
            actor.drop_keys.remote(key_id)
        except Exception:
            pass


def check_replicas(replicas: dict[str, int], model_ids: list[str], actors: int | None = None,
                   per_node: int | None = None) -> dict[str, int]:
    """``--ray-replicas`` against the served models: a one-line error for an unknown model, a count below one, or
    --ray-actors/--ray-actors-per-node when every model is listed (there would be no default actors to size)."""
    for model_id, n in replicas.items():
        if model_id not in model_ids:
            raise MedheError(f"--ray-replicas names {model_id!r}, which is not served here (served: "
                             f"{', '.join(model_ids)}); use one of those ids")
        if int(n) < 1:
            raise MedheError(f"--ray-replicas {model_id}={n}: each model needs at least 1 actor; leave the model out "
                             "to put it on the default actors")
    if replicas and all(m in replicas for m in model_ids) and (actors is not None or per_node is not None):
        raise MedheError("--ray-replicas lists every served model, so there are no default actors for --ray-actors "
                         "or --ray-actors-per-node to size: drop that flag, or leave a model out of --ray-replicas")
    return {model_id: int(n) for model_id, n in replicas.items()}
