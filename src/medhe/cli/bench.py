"""``medhe bench``: performance targets measured side by side with the reference tools, as JSON."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from medhe import atomic
from medhe.textformat import ms
from medhe.cli._paths import input_dir, output_file
from medhe.errors import MedheError
from medhe.he.scheme import default_model, scheme_hook, schemes
from medhe.machine import machine_info


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a scheme against its reference tool, or the service under load",
                       description="Run a benchmark and print/write JSON. --scheme ckks compares with TenSEAL's "
                                   "Tutorial-4 pipeline, --scheme tfhe with a plain concrete-python FCNN, "
                                   "--service runs concurrent clients against a real server on loopback.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--scheme", choices=schemes())
    what.add_argument("--service", action="store_true", help="load-test the HTTP service")
    p.add_argument("--model", help="model to benchmark (default: the scheme's shipped default)")
    p.add_argument("-n", "--images", type=int, default=20, help="images per measured pipeline")
    p.add_argument("--engine-only", action="store_true",
                   help="--scheme ckks: measure medhe alone (agreement, logit error, input load / eval / decrypt "
                        "latency, sizes, plan) without the TenSEAL comparison")
    p.add_argument("--baseline-images", type=int, default=1,
                   help="--scheme tfhe: images through the unrounded concrete-python baseline (minutes each)")
    p.add_argument("--against", metavar="MODEL",
                   help="--scheme tfhe: also time this TFHE model on the same images (ratio of server eval); "
                        "with --baseline-images 0 the concrete-python baseline is left out")
    p.add_argument("--rounded-baseline", action="store_true",
                   help="--scheme tfhe: add an extra row with the baseline's accumulators rounded to 6 bits")
    p.add_argument("--url", help="--service: an already running server (default: start one on 127.0.0.1)")
    p.add_argument("--clients", type=int, default=16, help="--service: concurrent clients")
    p.add_argument("--requests", type=int, default=200, help="--service: requests in all")
    p.add_argument("--workers", type=int, help="--service: server worker processes (0: one thread)")
    p.add_argument("--ops", action="store_true",
                   help="--scheme ckks: per-operation costs, native runtime vs seal-python, idle and other core busy")
    p.add_argument("--batch", action="store_true",
                   help="--scheme ckks: add batch-mode throughput (one image per slot, a full ciphertext batch) next "
                        "to the single-image path and TenSEAL")
    p.add_argument("--batch-repeats", type=int, default=3, help="--batch: evaluations of the batch (median)")
    p.add_argument("--kill-worker-after", type=int, metavar="N",
                   help="--service: SIGKILL one server worker after N completed requests (crash test; the SDK "
                        "re-registers and retries, the JSON reports how often)")
    p.add_argument("--sigterm-after", type=int, metavar="N",
                   help="--service: send the server SIGTERM after N completed requests (drain test; the JSON's "
                        "failed_requests splits retryable 503s, refused connections and lost requests)")
    p.add_argument("--soak", type=float, metavar="SECONDS",
                   help="--service: a bounded soak instead of the load test: SECONDS of mixed CKKS/Paillier/TFHE SDK "
                        "clients (every answer checked), uploads abandoned mid-body and slow clients, the web "
                        "process's and workers' RSS sampled each second against docs/service.md's bounds, the "
                        "spool checked empty at the end; exits 1 when a bound is broken")
    p.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS",
                   help="--soak: the server's --header-timeout (default medhe serve's)")
    p.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS",
                   help="--soak: the server's --body-timeout (default medhe serve's)")
    p.add_argument("--key-sets", type=int, metavar="N",
                   help="--service: instead of the load test, register one client's CKKS keys N times on a one-worker "
                        "server, delete them, and report the worker's memory before, loaded and after")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="--service: the server runs inference in Ray actors (medhe serve --ray) on the cluster at "
                        "ADDRESS; without ADDRESS the benchmark starts a local cluster of --ray-nodes loopback nodes")
    p.add_argument("--ray-nodes", type=int, default=2, help="--ray, local cluster: nodes (default 2)")
    p.add_argument("--ray-cpus-per-node", type=int, default=1, help="--ray, local cluster: CPUs per node (default 1)")
    p.add_argument("--ray-object-store-mb", type=int, default=1024, metavar="MB",
                   help="--ray, local cluster: object store per node in MiB (default 1024)")
    p.add_argument("--kill-node-after", type=int, metavar="N",
                   help="--ray, local cluster: kill one node (not the head) outright after N completed requests")
    p.add_argument("--compare", action="store_true",
                   help="--ray: also start plain medhe serve with one worker per cluster CPU, load both in turns "
                        "(--rounds times) and report per-core throughput side by side (median of the rounds)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--compare: load rounds, each plain then Ray (default 3)")
    p.add_argument("--data-dir")
    p.add_argument("--json", dest="json_out", help="write the JSON result to this file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.images < 1:
        raise MedheError("-n/--images must be at least 1")
    if args.batch and args.scheme != "ckks":
        raise MedheError("--batch works with --scheme ckks only")
    if args.engine_only and args.scheme != "ckks":
        raise MedheError("--engine-only applies to --scheme ckks only")
    if (args.ray is not None or args.kill_node_after is not None or args.compare) and not args.service:
        raise MedheError("--ray, --kill-node-after and --compare go with --service")
    json_out = output_file(args.json_out, "--json") if args.json_out else None
    args.data_dir = input_dir(args.data_dir, "--data-dir")
    started = time.time()
    if args.key_sets is not None and (not args.service or args.key_sets < 1):
        raise MedheError("--key-sets N (N >= 1) goes with --service")
    if args.soak is not None and (not args.service or args.url or args.ray is not None or args.key_sets):
        raise MedheError("--soak SECONDS goes with --service, and starts its own server (no --url, --ray, --key-sets)")
    if (args.header_timeout is not None or args.body_timeout is not None) and args.soak is None:
        raise MedheError("--header-timeout and --body-timeout go with --soak")
    if args.soak is not None:
        from medhe.service import protocol
        from medhe.service.soak import run_soak

        result = run_soak(args.soak, data_dir=args.data_dir, workers=2 if args.workers is None else args.workers,
                          header_timeout=args.header_timeout or protocol.DEFAULT_HEADER_TIMEOUT,
                          body_timeout=args.body_timeout or protocol.DEFAULT_BODY_TIMEOUT)
    elif args.service and args.key_sets:
        from medhe.service.keymemory import measure_key_memory

        result = measure_key_memory(args.model or "pneumoniamnist", args.key_sets)
    elif args.service and args.ray is not None:
        from medhe.service.loadtest import run_ray_benchmark

        if args.url or args.workers is not None or args.kill_worker_after is not None:
            raise MedheError("--ray starts its own server on the cluster: --url, --workers and --kill-worker-after "
                             "do not apply (use --kill-node-after)")
        result = run_ray_benchmark(args.ray or None, model=args.model or "pneumoniamnist", clients=args.clients,
                                   requests=args.requests, data_dir=args.data_dir, nodes=args.ray_nodes,
                                   cpus_per_node=args.ray_cpus_per_node, kill_node_after=args.kill_node_after,
                                   compare=args.compare, rounds=args.rounds,
                                   object_store_bytes=args.ray_object_store_mb << 20)
    elif args.service:
        from medhe.service.loadtest import run_service_benchmark

        if args.kill_node_after is not None or args.compare:
            raise MedheError("--kill-node-after and --compare go with --service --ray")

        result = run_service_benchmark(url=args.url, model=args.model or "pneumoniamnist", clients=args.clients,
                                       requests=args.requests, data_dir=args.data_dir, workers=args.workers,
                                       kill_worker_after=args.kill_worker_after,
                                       sigterm_after=args.sigterm_after)
    elif args.scheme == "ckks" and args.ops:
        result = {"op_costs_ms": scheme_hook("ckks", "run_op_costs")()}
    elif args.scheme == "ckks" and args.engine_only:
        result = scheme_hook("ckks", "run_engine_measurement")(args.model or default_model("ckks"), args.images,
                                                               data_dir=args.data_dir)
    elif args.scheme == "ckks":
        result = scheme_hook("ckks", "run_benchmark")(model=args.model or default_model("ckks"),
                                                      n_images=args.images, data_dir=args.data_dir)
        summary = scheme_hook("ckks", "format_benchmark")(result)
        print(summary)
        if args.batch:
            result["throughput"] = scheme_hook("ckks", "add_batch_comparison")(scheme_hook(
                "ckks", "run_batch_benchmark")(model=args.model or default_model("ckks"), data_dir=args.data_dir,
                                               repeats=args.batch_repeats), result)
            print(scheme_hook("ckks", "format_batch_throughput")(result["throughput"]))
    elif args.scheme == "tfhe":
        result = scheme_hook("tfhe", "run_benchmark")(model=args.model or default_model("tfhe"),
                                                      n_images=args.images, data_dir=args.data_dir,
                                                      baseline_images=args.baseline_images,
                                                      rounded_extra=args.rounded_baseline, against=args.against)
    else:
        # Paillier (no reference tool to race): per-stage latencies and sizes, warm vs empty re-randomisation pool
        result = scheme_hook(args.scheme, "run_benchmark")(args.model or default_model(args.scheme),
                                                           images=args.images, data_dir=args.data_dir)
    result = {"benchmark": "service" if args.service else args.scheme, "machine": machine_info(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "wall_s": round(time.time() - started, 1), **result}
    text = json.dumps(result, indent=2, default=float)
    status = 1 if result.get("ok") is False else 0  # the soak: a bound broken, a request wrong or lost
    if not json_out:
        print(text)
        return status
    atomic.write_text(json_out, text + "\n")  # --json: the JSON goes to the file only, a short summary here
    if args.scheme != "ckks" or args.engine_only:  # the CKKS comparison printed its own summary above
        print(short_summary(result))
    print(f"benchmark JSON written to {json_out}")
    return status


def short_summary(result: dict[str, Any]) -> str:
    """The top-level figures of a benchmark result, one per line (the nested detail stays in the JSON file)."""
    lines = []
    for key, value in result.items():
        if key in ("machine",):
            continue
        if isinstance(value, dict) and "median" in value:
            lines.append(f"{key}: median {ms(value['median'])} ms, p95 {ms(value.get('p95'))} ms")
        elif isinstance(value, float):
            lines.append(f"{key}: {value:.4g}")
        elif isinstance(value, (int, str)):
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
