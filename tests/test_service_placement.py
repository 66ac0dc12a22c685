"""Key placement over many register/delete rounds, on a real two-process ``WorkerPool`` with real CKKS keys.

A pool places each key set in the worker counting the fewest key bytes. It counted a set only once loaded
(registrations arriving together piled onto the worker whose loads were still running) and took back, on delete, the size
the server accounted for the set (``max(estimate, upload, memory growth)``) rather than what it had counted at
load (``max(estimate, upload)``): whenever the growth exceeded the estimate, a worker's count went below zero on
delete, every new key set went to that worker, and after a few rounds one worker held every client while the other
idled (the load test's plain-serve throughput fell to one worker's in later rounds).
"""

from __future__ import annotations

import asyncio
import collections
import json

import pytest

from medhe.he.scheme import client_for
from medhe.service.catalog import load_catalog
from medhe.service.worker import WorkerPool

pytestmark = pytest.mark.slow  # two worker processes compile a model


def test_placement_stays_balanced_over_register_delete_rounds(tmp_path):
    (served,) = load_catalog(["pneumoniamnist"])
    pool = WorkerPool([served.ref], processes=2)
    specs = pool.start()
    try:
        client = client_for(json.loads(json.dumps(specs[served.ref.id])))
        client.keygen()
        data = client.evaluation_keys()
        path = tmp_path / "keys.bin"
        path.write_bytes(data)

        async def one_round(r: int) -> list[tuple[int, int]]:
            # estimate 1 byte: the count is then the upload or the memory growth, whichever is larger, as when a
            # model's estimate is below what a worker really grows by
            placed = [(await pool.load_keys(served.ref.id, f"r{r}k{i}", str(path), len(data), 1))[0]
                      for i in range(4)]
            for i, (slot, generation) in enumerate(placed):
                pool.drop_keys(slot, generation, f"r{r}k{i}")
            return placed

        for r in range(4):
            placed = asyncio.run(one_round(r))
            per_worker = collections.Counter(slot for slot, _ in placed)
            assert sorted(per_worker.values()) == [2, 2], (r, per_worker, pool._key_bytes)
            assert pool._key_bytes == [0, 0], (r, pool._key_bytes)  # a delete takes back exactly what was counted

        async def staggered() -> list[tuple[int, int]]:
            # one registration done, then three at once: counted only after their loads, all three went to the
            # slot that had none yet (its in-flight loads were not counted), 1 + 3
            first = (await pool.load_keys(served.ref.id, "s0", str(path), len(data), 1))[0]
            rest = await asyncio.gather(*(pool.load_keys(served.ref.id, f"s{i}", str(path), len(data), 1)
                                          for i in (1, 2, 3)))
            return [first, *(placement for placement, _ in rest)]

        placed = asyncio.run(staggered())
        assert sorted(collections.Counter(slot for slot, _ in placed).values()) == [2, 2], placed
    finally:
        pool.close()
