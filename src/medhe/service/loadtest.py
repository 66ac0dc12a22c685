"""Load test of the service: N concurrent clients, each with its own keys, M encrypted inferences in all.

Each client generates and registers its own evaluation keys (as separate hospitals would), encrypts its images
once, then all clients fire requests together. Latency is the round trip of one inference request (upload,
queueing, server evaluation, download; client-side encryption is reported separately in ``setup``); every result
is decrypted and checked against the plaintext prediction when one is given, so the figure also proves that
concurrent requests did not corrupt each other. A probe polls ``/v1/health`` meanwhile: liveness under load.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from medhe.errors import MedheError
from medhe.service.client import Client


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def run_load_test(url: str, model: str | None = None, clients: int = 16, requests: int = 200,
                  images: Sequence[np.ndarray] | None = None, expected: Sequence[int] | None = None,
                  token: str | None = None, images_per_client: int = 2, data_dir: str | None = None,
                  kill_after: int | None = None, kill: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run the load and return figures (milliseconds, requests per second) plus failure and mismatch counts.

    ``images``: uint8 images to send (default: the first 32 test images of the dataset the served model's card
    names). ``expected``: the plaintext class index per image, to check every decrypted result.
    ``kill``: called once when ``kill_after`` requests have completed (e.g. SIGKILL one server worker); requests
    that fail because of it are retried by the SDK after re-registering the keys, and ``retries`` counts them.
    """
    if clients < 1 or requests < 1:
        raise MedheError("clients and requests must be at least 1")
    if images is None:
        images = _dataset_images(url, model, token, data_dir)
    if not len(images):
        raise MedheError("the load test needs at least one image")
    images = list(images)
    setup: list[dict[str, Any]] = [{} for _ in range(clients)]
    latencies: list[float] = []
    timeline: list[tuple[float, float, int]] = []  # (start s since load began, latency ms, client)
    t_start = [0.0]
    server_ms: list[float] = []
    errors: list[str] = []
    outcomes = {"refused_retryable": 0, "not_accepted": 0, "lost": 0}  # the failed requests, by what happened
    mismatches = 0
    retries = [0]
    killed: list[float] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        nonlocal mismatches
        client = Client(url, token=token)
        try:
            try:
                t0 = time.perf_counter()
                sess = client.session(model)
                t1 = time.perf_counter()
                picks = [(index * images_per_client + j) % len(images) for j in range(images_per_client)]
                cts = [sess.he.encrypt(sess.inputs(images[i])) for i in picks]
                setup[index] = {"keys_s": t1 - t0, "encrypt_s": (time.perf_counter() - t1) / len(picks),
                                "key_bytes": sess.key_bytes, "ciphertext_bytes": len(cts[0])}
            except Exception as exc:
                with lock:
                    errors.append(f"setup: {exc}")
                return
            finally:
                ready.wait()
            for n in counter:  # the shared iterator hands out request numbers until all are taken
                k = n % len(picks)
                try:
                    start = time.perf_counter()
                    response = client.infer_response(sess, cts[k])  # re-registers and retries if keys were lost
                    elapsed = (time.perf_counter() - start) * 1000.0
                    logits = sess.he.decrypt(response.content)
                    bad = expected is not None and int(np.argmax(logits)) != int(expected[picks[k]])
                    with lock:
                        timeline.append((start - t_start[0], elapsed, index))
                        latencies.append(elapsed)
                        server_ms.append(float(response.headers.get("X-Medhe-Eval-Ms", "nan")))
                        mismatches += int(bad)
                        fire = kill is not None and not killed and len(latencies) >= (kill_after or 0)
                        if fire:
                            killed.append(time.perf_counter() - t_start[0])
                    if fire:
                        kill()
                except Exception as exc:
                    with lock:
                        errors.append(f"request {n}: {exc}")
                        outcomes[failure_kind(exc)] += 1
        finally:
            with lock:
                retries[0] += client.retries
            try:
                client.forget_keys()  # be a good citizen: free the server's key store
            except MedheError:
                pass
            client.close()

    health_ms: list[float] = []
    health_at: list[float] = []
    finished = threading.Event()

    def probe() -> None:
        """Liveness under load: the web process must keep answering while workers evaluate."""
        import httpx

        with httpx.Client(base_url=url, timeout=60) as http:
            while not finished.wait(0.25):
                start = time.perf_counter()
                try:
                    http.get("/v1/health").raise_for_status()
                    health_ms.append((time.perf_counter() - start) * 1000.0)
                    health_at.append(start - t_start[0])
                except httpx.HTTPError as exc:
                    errors.append(f"health: {exc}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = t_start[0] = time.perf_counter()
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    finished.set()
    prober.join()
    done = [s for s in setup if s]
    return {
        "url": url, "model": model, "clients": clients, "requests": requests,
        "completed": len(latencies), "failures": requests - len(latencies), "errors": errors[:5],
        "mismatches": mismatches if expected is not None else None,
        "retries": retries[0], "worker_killed_at_s": killed[0] if killed else None,
        # failures split: a 503 with Retry-After (busy, shutting_down), a connection refused once the server had
        # stopped (nothing was sent), and lost: sent, but no answer (a reset or closed connection, a timeout)
        "failed_requests": dict(outcomes),
        "latency_ms": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95),
                       "mean": statistics.fmean(latencies) if latencies else None,
                       "max": max(latencies) if latencies else None},
        "server_eval_ms_p50": _percentile([v for v in server_ms if v == v], 50),
        "health_ms": {"p50": _percentile(health_ms, 50), "p95": _percentile(health_ms, 95),
                      "max": max(health_ms) if health_ms else None, "probes": len(health_ms),
                      "max_at_s": health_at[int(np.argmax(health_ms))] if health_ms else None},
        "slowest": [{"at_s": round(at, 2), "latency_ms": round(ms, 1), "client": c}
                    for at, ms, c in sorted(timeline, key=lambda t: -t[1])[:5]],
        "throughput_rps": len(latencies) / wall if wall > 0 else None,
        "load_wall_s": wall,
        "setup": {"clients_ready": len(done),
                  "keys_s_p50": _percentile([s["keys_s"] for s in done], 50),
                  "encrypt_s_p50": _percentile([s["encrypt_s"] for s in done], 50),
                  "key_bytes": done[0]["key_bytes"] if done else None,
                  "ciphertext_bytes": done[0]["ciphertext_bytes"] if done else None},
    }


def _dataset_images(url: str, model: str | None, token: str | None, data_dir: str | None,
                    n: int = 32) -> np.ndarray:
    from medhe.data import load_dataset

    with Client(url, token=token) as client:
        info = client.model_info(model)
    ds = info.get("dataset") or {}
    name = ds.get("name") or ds.get("path")
    if not name:
        raise MedheError(f"model {info['id']!r} names no dataset: pass images= to the load test")
    return load_dataset(name, split="test", size=ds.get("size"), data_dir=data_dir).images[:n]


def run_ray_benchmark(address: str | None = None, model: str = "pneumoniamnist", clients: int = 32,
                      requests: int = 128, data_dir: str | None = None, nodes: int = 2, cpus_per_node: int = 1,
                      kill_node_after: int | None = None, compare: bool = False, rounds: int = 3,
                      object_store_bytes: int = 1 << 30) -> dict[str, Any]:
    """``medhe bench --service --ray``: the same load test against ``medhe serve --ray``.

    ``address``: an existing cluster's head; ``None``: start ``nodes`` local nodes of ``cpus_per_node`` CPUs each
    on loopback addresses (``LocalCluster``), stopped afterwards. ``kill_node_after``: kill the last local node
    outright once that many requests completed (its actors and their keys die; the SDK re-registers and retries).
    ``compare``: plain ``medhe serve`` with as many worker processes as the cluster has CPUs beside the Ray server,
    both up at once and loaded in turns, ``rounds`` times (see ``_compare``).
    """
    from medhe.service.raycluster import LocalCluster, require_ray

    require_ray()
    if address is not None and kill_node_after is not None:
        raise MedheError("--kill-node-after needs the local cluster the benchmark starts (no address): it will not "
                         "kill a node of a cluster it did not start")
    if nodes < 1 or cpus_per_node < 1:
        raise MedheError("--ray-nodes and --ray-cpus-per-node must be at least 1")
    if compare and (address is not None or kill_node_after is not None):
        raise MedheError("--compare starts both servers itself and kills nothing: leave out the Ray address and "
                         "--kill-node-after")
    if rounds < 1:
        raise MedheError("--rounds must be at least 1")
    if object_store_bytes < (80 << 20):
        raise MedheError("--ray-object-store-mb must be at least 80 (Ray's minimum)")
    cluster = LocalCluster(nodes, cpus_per_node, object_store_bytes) if address is None else None
    try:
        if cluster is not None:
            cluster.start()
            address = cluster.address
        if compare:
            out = _compare(model, clients, requests, data_dir, address, nodes * cpus_per_node, rounds)
            out["server"] = {"ray": {"address": address, "local_nodes": nodes, "cpus_per_node": cpus_per_node}}
            return out
        result = run_service_benchmark(None, model, clients, requests, data_dir, workers=None,
                                       ray_address=address, kill_worker_after=kill_node_after,
                                       kill=cluster.kill_node if cluster is not None else None)
    finally:
        if cluster is not None:
            cluster.stop()
    result["server"]["ray"] = {"address": address, "local_nodes": nodes if cluster is not None else None,
                               "cpus_per_node": cpus_per_node if cluster is not None else None}
    if kill_node_after is not None:
        result["node_killed"] = result.pop("worker_killed", None)
        result["node_killed_at_s"] = result.pop("worker_killed_at_s", None)
    return result


def _compare(model: str, clients: int, requests: int, data_dir: str | None, address: str, cores: int,
             rounds: int) -> dict[str, Any]:
    """Per-core throughput of ``medhe serve --ray`` against plain ``medhe serve`` on the same cores.

    One load of a few seconds is at the mercy of whatever else the machine does in those seconds (the two runs of
    the first version of this benchmark, one after the other, gave ratios from 0.69 to 1.05 on an idle machine).
    So both servers are started first and stay up (an idle one costs next to nothing), each gets one warm-up load
    (one request per client, not counted: first calls pay one-off costs such as Ray's first object transfers
    between nodes), then each round loads plain, then Ray, with the same clients, images and request count; the
    ratio is taken per round and the median of the rounds is reported, beside every round's figures. Before each
    load both servers must report all their workers live (``/v1/ready``): a Ray actor still compiling (a
    replacement) takes no key sets, so the round would measure fewer actors. Plain serve counts a worker being
    replaced as live (it compiles on its first call), so this does not guard plain serve's own worker recycling.
    """
    from medhe.service.launch import ServerProcess

    images, expected = _benchmark_images(model, data_dir)
    caps = _key_caps(clients)
    per_round: list[dict[str, Any]] = []
    with ServerProcess([model], workers=cores, extra_args=caps) as plain_srv, \
            ServerProcess([model], workers=None, extra_args=[*caps, "--ray", address]) as ray_srv:
        warmup = {}
        for name, srv in (("plain", plain_srv), ("ray", ray_srv)):
            _wait_workers(srv.url, cores)
            warmup[name] = run_load_test(srv.url, None, clients, clients, images=images, expected=expected)
        for r in tqdm(range(rounds), desc="rounds (plain, then Ray)", unit="round"):
            row: dict[str, Any] = {"round": r + 1}
            for name, srv in (("plain", plain_srv), ("ray", ray_srv)):
                waited = _wait_workers(srv.url, cores)
                result = run_load_test(srv.url, None, clients, requests, images=images, expected=expected)
                result["waited_for_workers_s"] = waited
                result["load_average"] = os.getloadavg()
                row[name] = result
            rate = {k: (row[k]["throughput_rps"] or 0.0) / cores for k in ("plain", "ray")}
            row["per_core_rps"] = rate
            row["ray_vs_plain"] = rate["ray"] / rate["plain"] if rate["plain"] else None
            per_round.append(row)
    ratios = [row["ray_vs_plain"] for row in per_round if row["ray_vs_plain"] is not None]
    ratio = statistics.median(ratios) if ratios else None
    return {
        "cores": cores, "rounds": per_round,
        "warmup": {k: {"completed": v["completed"], "failures": v["failures"], "mismatches": v["mismatches"],
                       "throughput_rps": v["throughput_rps"]} for k, v in warmup.items()},
        "failures": sum(row[k]["failures"] for row in [*per_round, warmup] for k in ("plain", "ray")),
        "wrong": sum(row[k]["mismatches"] or 0 for row in [*per_round, warmup] for k in ("plain", "ray")),
        "per_core_rps": {k: statistics.median(row["per_core_rps"][k] for row in per_round) for k in ("plain", "ray")},
        "ray_vs_plain_per_round": ratios,
        "ray_vs_plain": ratio,
        "within_15_percent": ratio is not None and ratio >= 0.85,
    }


def _wait_workers(url: str, workers: int, timeout: float = 300.0) -> float:
    """Seconds until the server at ``url`` reports ``workers`` live workers (``/v1/ready``)."""
    import httpx

    start = time.monotonic()
    while True:
        try:
            live = httpx.get(f"{url}/v1/ready", timeout=10).json().get("workers", 0)
        except (httpx.HTTPError, ValueError):
            live = 0
        if live >= workers:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise MedheError(f"the server at {url} still has {live} of {workers} workers live after {timeout:.0f} s")
        time.sleep(0.2)


def _benchmark_images(model: str, data_dir: str | None, n_images: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The model's own test images and their plaintext predictions (every decrypted answer is checked)."""
    from medhe.data import load_dataset
    from medhe.models.artifact import load_artifact
    from medhe.models.predict import model_inputs, predict_logits
    from medhe.service.catalog import parse_model_arg

    source, _ = parse_model_arg(model)
    artifact = load_artifact(source)
    card_ds = artifact.card.get("dataset") or {}
    name = card_ds.get("name") or card_ds.get("path")
    if not name:
        raise MedheError(f"model {artifact.name!r} records no dataset to draw benchmark images from")
    ds = load_dataset(name, split="test", size=card_ds.get("size"), data_dir=data_dir)
    images = ds.images[:n_images]
    return images, predict_logits(artifact.model, model_inputs(artifact, images)).argmax(axis=1)


def failure_kind(exc: Exception) -> str:
    """How a request failed, for the load test's accounting: ``refused_retryable``, ``not_accepted`` or ``lost``."""
    from medhe.service.errors import ServiceError

    if isinstance(exc, ServiceError):
        return "refused_retryable" if exc.status == 503 else "lost"
    text = str(exc)
    return "not_accepted" if "cannot reach" in text and "ConnectError" in text else "lost"


def _key_caps(clients: int) -> list[str]:
    """A benchmark server admits every client's keys and uploads at once: this measures throughput, not eviction."""
    return ["--max-keys-per-client", str(clients + 8), "--max-keys", str(max(256, 2 * clients)),
            "--max-uploads", str(clients + 8),
            "--max-key-bytes", str(max(4 << 30, clients * (256 << 20)))]


def run_service_benchmark(url: str | None = None, model: str = "pneumoniamnist", clients: int = 16,
                          requests: int = 200, data_dir: str | None = None, workers: int | None = None,
                          n_images: int = 32, kill_worker_after: int | None = None, ray_address: str | None = None,
                          kill: Callable[[], Any] | None = None, sigterm_after: int | None = None
                          ) -> dict[str, Any]:
    """``medhe bench --service``: start a server on 127.0.0.1 (unless ``url`` is given) and load-test it.

    Images are the model's own test split; when this function starts the server it also knows the model, so every
    decrypted prediction is checked against the plaintext prediction. The server it starts admits every client's
    keys at once (key caps raised: this measures throughput, not eviction). ``kill_worker_after``: SIGKILL one
    worker process once that many requests have completed (needs a server started here with >= 1 process).
    ``ray_address``: the server runs its inference in Ray actors on that cluster (``medhe serve --ray``); ``kill``
    then replaces the worker kill (e.g. kill one node of a local cluster). ``sigterm_after``: instead, send the
    server SIGTERM once that many requests have completed (it drains: ``failed_requests`` tells refused from lost).
    """
    from medhe.models.artifact import load_artifact
    from medhe.service.catalog import parse_model_arg
    from medhe.service.launch import ServerProcess

    images, expected = _benchmark_images(model, data_dir, n_images)
    if url is not None:
        if kill_worker_after is not None:
            raise MedheError("--kill-worker-after needs a server started by the benchmark (no --url)")
        name = load_artifact(parse_model_arg(model)[0]).name
        result = run_load_test(url, None if ":" in model else name, clients, requests, images=images,
                               expected=expected)
        return {"server": "external", **result}
    if sigterm_after is not None and (kill_worker_after is not None or url is not None):
        raise MedheError("--sigterm-after needs a server started by the benchmark, and no --kill-worker-after")
    if kill_worker_after is not None and workers == 0 and ray_address is None:
        raise MedheError("--kill-worker-after needs worker processes (--workers >= 1)")
    caps = _key_caps(clients)
    if ray_address is not None:
        caps += ["--ray", ray_address]
    with ServerProcess([model], workers=workers, extra_args=caps) as server:
        killed: list[Any] = []

        def kill_worker() -> None:
            if sigterm_after is not None:
                server.proc.send_signal(signal.SIGTERM)
                killed.append(server.proc.pid)
                return
            if kill is not None:
                killed.append(kill())
                return
            pids = server.worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        trigger = sigterm_after if sigterm_after is not None else kill_worker_after
        result = run_load_test(server.url, None, clients, requests, images=images, expected=expected,
                               kill_after=trigger, kill=kill_worker if trigger is not None else None)
        if kill_worker_after is not None:
            result["worker_killed"] = bool(killed)
        if sigterm_after is not None:
            result["server_sigtermed"] = bool(killed)
            result["sigterm_at_s"] = result.pop("worker_killed_at_s", None)
            try:
                result["server_exit_status"] = server.proc.wait(timeout=60)
            except Exception:
                result["server_exit_status"] = None
    where = "ray actors" if ray_address is not None else (workers if workers is not None else "default")
    return {"server": {"host": "127.0.0.1", "workers": where}, **result}
