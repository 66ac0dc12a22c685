"""What registering and deleting CKKS key sets does to a worker's resident memory (issue #16).

Starts ``medhe serve`` (one worker) on 127.0.0.1, generates one client's keys, registers them N times (each
registration is deserialized afresh in the worker, exactly as N clients' keys would be), reads the worker's RSS
and the server's key accounting, deletes every set, waits, reads the RSS again. Behind
``medhe bench --service --key-sets N``.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from medhe.service import protocol
from medhe.service.client import Client
from medhe.service.launch import ServerProcess
from medhe.service.memwatch import rss


def measure_key_memory(model: str = "pneumoniamnist", sets: int = 30) -> dict[str, Any]:
    caps = ["--max-key-bytes", str(64 << 30), "--max-keys-per-client", str(sets + 1)]
    with ServerProcess([model], workers=1, extra_args=caps) as srv, Client(srv.url) as client:
        (worker,) = srv.worker_pids()
        sess = client.session()  # one registration, to warm up (and the SDK's own keys)
        client.forget_keys()
        time.sleep(1.0)
        start = rss(worker)
        data = sess.evaluation_keys()
        ids = []
        t0 = time.perf_counter()
        for _ in range(sets):
            r = httpx.post(srv.url + sess.info["endpoints"]["keys"], content=data,
                           headers={"Content-Type": protocol.OCTET}, timeout=600)
            r.raise_for_status()
            ids.append(r.json())
        loaded_s = time.perf_counter() - t0
        full = rss(worker)
        ready = httpx.get(srv.url + "/v1/ready").json()
        for reply in ids:
            httpx.delete(srv.url + protocol.key_path(reply["key_id"]),
                         headers={protocol.KEY_SECRET_HEADER: reply["key_secret"]}).raise_for_status()
        # drops are fire-and-forget; a worker left without keys but with grown memory is replaced (SEAL's memory
        # pool never returns what key sets used): wait for that, then read the slot's process again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and srv.worker_pids() == [worker]:
            time.sleep(0.5)
        time.sleep(2.0)
        (now,) = srv.worker_pids()
        end = rss(now)
        return {
            "model": model, "sets": sets, "bytes_sent_per_set": len(data),
            "held_bytes_accounted_per_set": ids[0]["held_bytes"],
            "worker_rss_start_mib": round(start / 2**20, 1), "worker_rss_loaded_mib": round(full / 2**20, 1),
            "worker_rss_after_delete_mib": round(end / 2**20, 1),
            "rss_growth_per_set_mib": round((full - start) / sets / 2**20, 2),
            "accounted_key_bytes_mib": round(ready["key_bytes"] / 2**20, 1),
            "after_delete_vs_start": round(end / start, 3), "register_s_total": round(loaded_s, 1),
            "worker_recycled": now != worker,
        }

