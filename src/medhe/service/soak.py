"""``medhe bench --service --soak SECONDS``: a bounded soak of one server under mixed, partly hostile clients.

It starts ``medhe serve`` on 127.0.0.1 with one CKKS, one Paillier and one TFHE model (its spool and temp folders
in a private ``$TMPDIR``), then for the given seconds runs together: SDK clients of every scheme diagnosing real
test images (each decrypted answer compared with the plaintext model's), clients that hang up mid-upload, slow
clients within and beyond the server's read timeouts (``soakclients``), and a watch on the resident memory of the
web process and of every worker and on the spool, each second (``memwatch``). At the end it checks the bounds of
docs/service.md ("Memory bounded by design") computed from the limits the server reports:

    web process RSS  <=  its RSS once ready and warmed up
                         + max_uploads x 2 x max(limits.input_bytes)      (inference bodies held)
                         + max_connections x 64 KiB                        (waiting connections)
                         + max_batch_key_bytes                             (batch keys, none here)
    each worker RSS  <=  its RSS once ready (compiled, no keys) + max_key_bytes
    all workers      <=  the sum of those + max_key_bytes                  (keys live in one worker each)

and that the spool is empty once the last request has been answered, no key set is left after every client
deleted its own, and nothing stays in the temp folder after the server stopped. ``ok`` is false (and the command
exits 1) when a request was answered wrong, lost, answered unexpectedly, or a bound was broken.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from medhe.errors import MedheError
from medhe.service import protocol
from medhe.service.launch import ServerProcess
from medhe.service.memwatch import MemWatch, mib, rss, spool_files
from medhe.service.soakclients import LOST, Subject, Tally, abandon_client, normal_client, slow_client

MODELS = {"ckks": "pneumoniamnist", "paillier": "covid-cxr", "tfhe": "pneumoniamnist-qfcnn"}
#: Key memory of the soak's server: room for every set the soak registers at once (3 CKKS at 84 MiB, 2 TFHE at
#: 545 MiB, 3 Paillier, 2 slow CKKS registrations), so none is evicted; the worker bound is computed from it.
MAX_KEY_BYTES = 2 << 30
MAX_BATCH_KEY_BYTES = 32 << 20  # the soak uses no batch mode; the web bound counts this cap all the same
WAITING_CONNECTION_BYTES = 64 << 10  # uvicorn stops reading a connection once this much is buffered


def run_soak(seconds: float, data_dir: str | None = None, workers: int | None = 2,
             header_timeout: float = protocol.DEFAULT_HEADER_TIMEOUT,
             body_timeout: float = protocol.DEFAULT_BODY_TIMEOUT, max_uploads: int = protocol.DEFAULT_MAX_UPLOADS,
             max_connections: int = protocol.DEFAULT_MAX_CONNECTIONS, clients: dict[str, int] | None = None,
             abandoners: int = 1, slow: int = 2, models: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the soak for ``seconds`` and return its report (see the module docstring); ``clients``: SDK clients per
    scheme (default CKKS 2, Paillier 2, TFHE 1)."""
    if seconds <= 0:
        raise MedheError("--soak SECONDS must be positive")
    models = {**MODELS, **(models or {})}
    clients = {"ckks": 2, "paillier": 2, "tfhe": 1, **(clients or {})}
    tmp = Path(tempfile.mkdtemp(prefix="medhe-soak-"))
    token = os.urandom(16).hex()
    args = ["--max-key-bytes", str(MAX_KEY_BYTES), "--max-batch-key-bytes", str(MAX_BATCH_KEY_BYTES),
            "--header-timeout", str(header_timeout), "--body-timeout", str(body_timeout),
            "--max-uploads", str(max_uploads), "--max-connections", str(max_connections)]
    env = {"TMPDIR": str(tmp), "MEDHE_TMPDIR": str(tmp / "medhe-tmp")}  # spool and Concrete's folders: ours
    load_before = os.getloadavg()
    server = ServerProcess([f"{m}:{s}" for s, m in models.items()], workers=workers, token=token,
                           extra_args=args, env=env)
    try:
        server.start()
        report = _soak(server, tmp, token, seconds, data_dir, models, clients, abandoners, slow, header_timeout,
                       body_timeout, max_connections)
    finally:
        log = server.log() if server.proc is not None else ""
        server.stop()
    report["server_log_tracebacks"] = log.count("Traceback")
    if report["server_log_tracebacks"]:
        report["server_log_tail"] = log[-3000:]
    root = tmp / "medhe-tmp"  # medhe's temp root itself stays (empty); what matters is what is in it
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p != root)
    report["tmp_left_after_stop"] = left
    shutil.rmtree(tmp, ignore_errors=True)
    report["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    broken = report["broken"]
    if report["server_log_tracebacks"]:
        broken.append(f"the server logged {report['server_log_tracebacks']} traceback(s)")
    if left:
        broken.append(f"{len(left)} path(s) left in the server's temp folder after it stopped")
    report["ok"] = not broken
    return report


def _soak(server: ServerProcess, tmp: Path, token: str, seconds: float, data_dir: str | None,
          models: dict[str, str], clients: dict[str, int], abandoners: int, slow: int, header_timeout: float,
          body_timeout: float, max_connections: int) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {token}"}
    worker_start = {pid: rss(pid) for pid in server.worker_pids()}
    web_start = rss(server.proc.pid)
    tally = Tally()
    t0 = time.monotonic()
    subjects = [Subject(scheme, model, server.url, token, data_dir) for scheme, model in models.items()]
    setup_s = time.monotonic() - t0
    for subject in subjects:  # warm-up: one checked diagnosis per scheme through the setup client
        result = subject.client.diagnose(subject.images[0], model=subject.id)
        tally.add("warmup", "right" if subject.check(0, result.logits, tally) else "wrong")
    limits = _limits(server.url, auth)
    web_warm = rss(server.proc.pid)
    stop = threading.Event()
    threads = []
    for subject in subjects:
        for k in range(clients.get(subject.scheme, 0)):
            threads.append(threading.Thread(target=normal_client, args=(subject, stop, tally, 5 * k),
                                            name=f"soak-{subject.scheme}-{k}", daemon=True))
    for k in range(abandoners):
        threads.append(threading.Thread(target=abandon_client, args=(subjects, stop, tally),
                                        name=f"soak-abandon-{k}", daemon=True))
    for k in range(slow):
        threads.append(threading.Thread(target=slow_client,
                                        args=(subjects, stop, tally, header_timeout, body_timeout, 7 * k),
                                        name=f"soak-slow-{k}", daemon=True))
    watch = MemWatch(server.proc.pid, server.worker_pids, tmp,
                     key_bytes=lambda: _ready(server.url, timeout=5).get("key_bytes", 0),
                     workers_start=sum(worker_start.values())).start()
    started = time.monotonic()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    join_by = time.monotonic() + body_timeout + 120  # a slow client in its last request; a TFHE re-registration
    stuck = [t.name for t in threads if (t.join(max(0.0, join_by - time.monotonic())) or t.is_alive())]
    load_s = time.monotonic() - started
    idle_s = _wait_idle(server.url, auth)
    time.sleep(1.0)
    spool_left = [p.name for p in spool_files(tmp)]
    watch.stop()
    for subject in subjects:
        subject.close()
    keys_left = _ready(server.url).get("keys")
    time.sleep(5.0)  # key drops are fire and forget; a worker left without keys but grown is recycled
    after_delete = {str(pid): mib(rss(pid)) for pid in server.worker_pids()}
    memory = watch.figures()
    bounds = _bounds(limits, web_warm, worker_start, max_connections)
    report = {
        "soak_s": seconds, "load_wall_s": round(load_s, 1), "setup_s": round(setup_s, 1),
        "models": {s.scheme: s.id for s in subjects},
        "clients": {**{f"{s}_sdk": n for s, n in clients.items()}, "abandoning": abandoners, "slow": slow},
        "server": {"workers": len(worker_start), "header_timeout_s": header_timeout, "body_timeout_s": body_timeout,
                   **{k: v for k, v in limits.items() if k != "models"}, "max_connections": max_connections,
                   "models": limits["models"]},
        "requests": tally.report(),
        "wrong": tally.total("wrong"),
        "lost": tally.total(LOST),
        "unexpected": tally.total("unexpected"),
        "refused_retryable": tally.total("refused_retryable"),
        "failure_examples": dict(tally.examples),
        "max_logit_error": dict(tally.max_logit_error),
        "images": {s.scheme: {"used": len(s.images), "skipped_unusual": s.skipped_unusual} for s in subjects},
        "memory": {**memory, "web_start_mib": mib(web_start), "web_warm_mib": mib(web_warm),
                   "worker_start_each_mib": {str(p): mib(v) for p, v in worker_start.items()}, **bounds},
        "spool": {"files_at_end": spool_left, "peak_files": memory["spool_peak_files"],
                  "peak_mib": memory["spool_peak_mib"],
                  # docs/service.md: max_uploads x the largest key upload (the soak sends no batch)
                  "bound_mib": mib(limits["max_uploads"] * max(m["key_bytes"] for m in limits["models"].values()))},
        "keys_left_after_clients_deleted": keys_left,
        "worker_rss_after_keys_deleted_mib": after_delete,
        "threads_still_running": stuck, "idle_wait_s": idle_s,
    }
    report["broken"] = _broken(report, memory, bounds)
    return report


def _held(report: dict[str, Any], memory: dict[str, Any], bounds: dict[str, Any]) -> dict[str, bool]:
    """Each bound of the module docstring: held or not (peaks: the larger of the samples and the kernel's VmHWM)."""
    worst = max([*memory["worker_peak_each_mib"].values(), *memory["worker_hwm_each_mib"].values()], default=0)
    return {"web_rss": max(memory["web_peak_mib"], memory["web_hwm_mib"]) <= bounds["web_bound_mib"],
            "worker_rss_each": worst <= bounds["worker_bound_each_mib"],
            "workers_rss_total": memory["workers_total_peak_mib"] <= bounds["workers_bound_total_mib"],
            "spool_empty_at_end": not report["spool"]["files_at_end"],
            "no_keys_left": not report["keys_left_after_clients_deleted"]}


def _ready(url: str, timeout: float = 60.0) -> dict[str, Any]:
    return httpx.get(url + f"{protocol.PREFIX}/ready", timeout=timeout).json()


def _limits(url: str, auth: dict[str, str]) -> dict[str, Any]:
    """The limits the server runs with, as it reports them (/v1/ready and every model's ``limits``)."""
    ready = _ready(url)
    listing = httpx.get(url + protocol.models_path(), headers=auth, timeout=60).json()["models"]
    return {"max_uploads": ready["max_uploads"], "max_key_bytes": ready["max_key_bytes"],
            "max_batch_key_bytes": ready["max_batch_key_bytes"],
            "models": {m["id"]: m["limits"] for m in listing}}


def _wait_idle(url: str, auth: dict[str, str], timeout: float = 120.0) -> float:
    """Seconds until no upload is in progress (every request answered or cut off)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _ready(url).get("uploads", 0) == 0:
            break
        time.sleep(0.5)
    return round(time.monotonic() - start, 1)


def _bounds(limits: dict[str, Any], web_warm: int, worker_start: dict[int, int], max_connections: int
            ) -> dict[str, Any]:
    bodies = limits["max_uploads"] * 2 * max(m["input_bytes"] for m in limits["models"].values())
    waiting = max_connections * WAITING_CONNECTION_BYTES
    web = web_warm + bodies + waiting + limits["max_batch_key_bytes"]
    keys = limits["max_key_bytes"]
    each = max(worker_start.values(), default=0) + keys
    total = sum(worker_start.values()) + keys
    return {"web_bound_mib": mib(web),
            "web_bound_terms_mib": {"warm": mib(web_warm), "bodies": mib(bodies), "waiting_connections": mib(waiting),
                                    "batch_keys": mib(limits["max_batch_key_bytes"])},
            "worker_bound_each_mib": mib(each), "workers_bound_total_mib": mib(total),
            "worker_bound_terms_mib": {"start_max": mib(max(worker_start.values(), default=0)),
                                       "start_sum": mib(sum(worker_start.values())), "max_key_bytes": mib(keys)}}


def _broken(report: dict[str, Any], memory: dict[str, Any], bounds: dict[str, Any]) -> list[str]:
    out = []
    report["bounds_held"] = _held(report, memory, bounds)
    for what in ("wrong", "lost", "unexpected"):
        if report[what]:
            out.append(f"{report[what]} request(s) {what}")
    web = max(memory["web_peak_mib"], memory["web_hwm_mib"])
    if web > bounds["web_bound_mib"]:
        out.append(f"web process peaked at {web} MiB > bound {bounds['web_bound_mib']} MiB")
    worst = max([*memory["worker_peak_each_mib"].values(), *memory["worker_hwm_each_mib"].values()], default=0)
    if worst > bounds["worker_bound_each_mib"]:
        out.append(f"a worker peaked at {worst} MiB > bound {bounds['worker_bound_each_mib']} MiB")
    if memory["workers_total_peak_mib"] > bounds["workers_bound_total_mib"]:
        out.append(f"workers peaked at {memory['workers_total_peak_mib']} MiB together > bound "
                   f"{bounds['workers_bound_total_mib']} MiB")
    if report["spool"]["files_at_end"]:
        out.append(f"{len(report['spool']['files_at_end'])} file(s) left in the spool after the last answer")
    if report["keys_left_after_clients_deleted"]:
        out.append(f"{report['keys_left_after_clients_deleted']} key set(s) still accounted after every client "
                   "deleted its own")
    if report["threads_still_running"]:
        out.append(f"client threads did not finish: {', '.join(report['threads_still_running'])}")
    if not report["requests"].get("warmup", {}).get("right"):
        out.append("the warm-up diagnoses were not all right")
    return out
