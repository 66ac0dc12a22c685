"""Batch scoring on a Ray cluster (``medhe score --ray``): encrypt here, evaluate across the cluster, decrypt here.

The secret key never leaves this process: Ray actors receive evaluation keys and ciphertexts only, through Ray's
object store, and return encrypted logits. A CKKS model without a client stage runs in batch mode (one image per
slot): the folder is cut into one chunk per actor (at most a full ciphertext batch each), so a small folder still
uses every node, and only relinearization keys travel (put once in the object store). Any other model goes one
image per call, with its evaluation keys loaded into every actor once. A chunk or image whose actor is lost (its
node died) is sent again to a live actor; results are only ever decrypted from a completed evaluation, so a
failure can delay a diagnosis but never change one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Callable, Sequence

import numpy as np

from medhe.errors import MedheError
from medhe.service.client import Diagnosis, interpret
from medhe.service.errors import ServiceError

log = logging.getLogger("medhe.service")
BATCH_MIN_PER_ACTOR = 256  # below this many images per actor, one image per call is faster (docs/scale-out.md)
ATTEMPTS = 4  # tries per chunk or image: each failed one lost its actor, which is then replaced


def score(model: str, images: Sequence[np.ndarray], sources: Sequence[str], actors: int | None = None,
          chunk: int | None = None, progress: bool = True, batch: bool | None = None,
          on_result: Callable[[int], Any] | None = None) -> tuple[list[Diagnosis], dict[str, Any]]:
    """Diagnoses of ``images`` (uint8 arrays, named ``sources``) by ``model`` on the connected Ray cluster, and
    run figures. ``batch``: force batch mode on/off (default: batch mode where the model supports it and the folder
    holds at least ``BATCH_MIN_PER_ACTOR`` images per actor). ``on_result(n)``: called with the number of images
    evaluated so far, after each evaluation (progress reporting)."""
    from medhe.service.catalog import load_catalog
    from medhe.service.raypool import RayPool

    if not len(images):
        raise MedheError("nothing to score: the folder holds no images")
    (served,) = load_catalog([model])
    if batch is None:  # a batch costs a full ciphertext set however few images fill it: worth it for many images
        from medhe.service.raycluster import require_ray

        cpus = actors or max(1, int(require_ray().cluster_resources().get("CPU", 1)))
        batch = served.batch_capable and len(images) >= BATCH_MIN_PER_ACTOR * cpus
    use_batch = batch
    if use_batch and not served.batch_capable:
        raise MedheError(f"model {served.id!r} has no batch mode (it is for CKKS models without a client stage)")
    pool = RayPool([served.ref], batch=use_batch, actors=actors)
    started = time.perf_counter()
    specs = pool.start()
    compiled = time.perf_counter()
    n_actors = pool.size
    try:
        run = _score_batch if use_batch else _score_single
        logits, stats = asyncio.run(run(pool, served, specs[served.id], images, chunk, progress, on_result))
    finally:
        pool.close()
    task, labels = served.card["task"], list(served.card["labels"])
    version = str(served.card.get("version") or "unknown")
    results = [interpret(task, labels, logits[i], served.id, sources[i], version=version) for i in range(len(images))]
    stats.update({"model": served.id, "mode": "batch" if use_batch else "single", "images": len(images),
                  "actors": n_actors, "replaced_actors": pool.restarts,
                  "compile_s": round(compiled - started, 2), "score_s": round(time.perf_counter() - compiled, 2)})
    return results, stats


async def _fan_out(pool: Any, jobs: list[Any], call, bar, on_result=None, wait_s: float = 300.0
                   ) -> tuple[list[Any], int]:
    """Run ``call(slot, job)`` for every job over the pool's live actors, one job per actor at a time; a job whose
    actor was lost goes to another. Returns the results in job order and how many jobs were sent again."""
    results: list[Any] = [None] * len(jobs)
    todo: asyncio.Queue = asyncio.Queue()
    for i in range(len(jobs)):
        todo.put_nowait((i, 0))
    retries = done = 0
    generation: dict[int, int] = {}

    async def runner(slot: int) -> None:
        nonlocal retries, done
        while not todo.empty():
            if not pool.holds((slot, generation[slot])):
                return  # this actor was replaced: leave the jobs to live ones
            i, tries = todo.get_nowait()
            try:
                results[i] = await call(slot, jobs[i])
                n = jobs[i].count if isinstance(jobs[i], _Chunk) else 1
                done += n
                bar.update(n)
                if on_result is not None:
                    on_result(done)
            except ServiceError as exc:
                if exc.code != "worker_crashed" or tries + 1 >= ATTEMPTS:
                    raise
                retries += 1
                todo.put_nowait((i, tries + 1))
                return  # this slot's actor is gone

    deadline = time.monotonic() + wait_s
    while not todo.empty():
        slots = pool.ready_slots()
        if not slots:  # every actor lost: wait for a replacement to be placed
            if time.monotonic() > deadline:
                raise MedheError("no Ray actor is left to evaluate on (nodes lost, no free CPU for replacements); "
                                 "check `ray status` and run again")
            await asyncio.sleep(1.0)
            continue
        generation.update(dict(slots))
        await asyncio.gather(*(runner(slot) for slot, _ in slots))
    return results, retries


class _Chunk:
    def __init__(self, data: bytes, count: int):
        self.data, self.count = data, count


async def _score_batch(pool: Any, served: Any, spec: dict, images: Sequence[np.ndarray], chunk: int | None,
                       progress: bool, on_result=None) -> tuple[np.ndarray, dict[str, Any]]:
    from tqdm import tqdm

    from medhe.data import Preprocess
    from medhe.he.scheme import batch_client_for
    from medhe.service.raycluster import require_ray

    he = batch_client_for(spec)
    he.keygen()
    keys = require_ray().put(he.evaluation_keys())  # once in the object store, read by every actor
    pre = Preprocess.from_dict(served.card["preprocessing"])
    x = np.stack([np.asarray(pre(img), dtype=np.float32) for img in images])
    per = chunk or max(1, -(-len(x) // max(1, pool.size)))
    per = min(per, he.batch)
    t0 = time.perf_counter()
    jobs = [_Chunk(next(he.iter_encrypt(x[s:s + per])), len(x[s:s + per])) for s in range(0, len(x), per)]
    encrypt_s = time.perf_counter() - t0

    async def call(slot: int, job: _Chunk) -> bytes:
        out, _ms = await pool.infer_batch(slot, served.id, keys, job.data)
        return out

    with tqdm(total=len(x), unit="img", desc="encrypted scoring (Ray)", disable=not progress) as bar:
        outs, retries = await _fan_out(pool, jobs, call, bar, on_result)
    logits = np.concatenate([he.decrypt_one(out)[: job.count] for out, job in zip(outs, jobs)])
    return logits, {"chunks": len(jobs), "images_per_chunk": per, "retries": retries,
                    "encrypt_s": round(encrypt_s, 2), "upload_bytes": sum(len(j.data) for j in jobs)}


async def _score_single(pool: Any, served: Any, spec: dict, images: Sequence[np.ndarray], chunk: int | None,
                        progress: bool, on_result=None) -> tuple[np.ndarray, dict[str, Any]]:
    from tqdm import tqdm

    from medhe.service.client import _ModelSession

    served.spec = spec
    sess = _ModelSession(served.describe(), served.client_weights)
    eval_keys = sess.evaluation_keys()
    key_id = secrets.token_urlsafe(18)
    loaded: dict[int, int] = {}  # slot -> generation its copy of the keys was loaded into

    t0 = time.perf_counter()
    cts = [sess.he.encrypt(sess.inputs(img)) for img in images]
    encrypt_s = time.perf_counter() - t0

    async def call(slot: int, ct: bytes) -> bytes:
        generation = pool.generation[slot]
        if loaded.get(slot) != generation:  # first use of this actor, or a replacement: it needs the keys
            await pool.load_key_bytes(served.id, key_id, eval_keys, 0, slot=slot)
            loaded[slot] = generation
        out, _ms = await pool.infer(slot, served.id, key_id, ct)
        return out

    with tqdm(total=len(cts), unit="img", desc="encrypted scoring (Ray)", disable=not progress) as bar:
        outs, retries = await _fan_out(pool, cts, call, bar, on_result)
    logits = np.stack([np.asarray(sess.he.decrypt(out), dtype=np.float64).reshape(-1) for out in outs])
    return logits, {"retries": retries, "encrypt_s": round(encrypt_s, 2),
                    "upload_bytes": sum(len(c) for c in cts) + len(eval_keys) * max(1, len(loaded))}
