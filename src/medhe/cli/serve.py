"""``medhe serve``: the encrypted diagnosis server (FastAPI on uvicorn) for one or more models."""

from __future__ import annotations

import argparse
import logging
import os

from medhe.cli._config import add_config_argument
from medhe.errors import MedheError
from medhe.service import protocol

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models for encrypted inference over HTTP",
                       description="Serve models for encrypted inference. Clients register public evaluation "
                                   "keys, send ciphertexts and decrypt the results themselves; see docs/service.md.")
    p.add_argument("--model", action="append", default=[], metavar="NAME|DIR[:SCHEME]",
                   help="model to serve (repeatable); scheme defaults to the card's default, else ckks")
    p.add_argument("--key-switching", choices=("seal", "hybrid"),
                   help="CKKS models: the evaluation keys' format their plans are compiled for, seal (SEAL's: one "
                        "special prime, a digit per data prime) or hybrid (issue 29: a few digits and several "
                        "special primes chosen by the planner, keys several times smaller, key envelope version 2; "
                        "needs the native runtime). Default: each card's scheme_options, else seal")
    p.add_argument("--encrypted-model", action="append", default=[], metavar="ENCDIR",
                   help="encrypted model to serve (repeatable; medhe encrypt-model): its weights are ciphertexts "
                        "under the key holder's key, and only that key set's evaluation keys are accepted")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help=f"require this bearer token (default: ${protocol.TOKEN_ENV} if set)")
    p.add_argument("--workers", type=int, default=None,
                   help="inference worker processes (default: one per core, max 4; 0 = threads in this process)")
    p.add_argument("--max-body", type=_size, default=None, metavar="BYTES",
                   help="largest accepted ciphertext upload, e.g. 8M (default: what each model's spec needs plus "
                        "a margin; 256M for TFHE models)")
    p.add_argument("--max-batch-bytes", type=_size, default=protocol.DEFAULT_MAX_BATCH_BODY, metavar="BYTES",
                   help="largest encrypted batch upload (batch mode, 413 beyond it; default 512M)")
    p.add_argument("--max-key-bytes", type=_size, default=protocol.DEFAULT_MAX_KEY_BYTES, metavar="BYTES",
                   help="memory all clients' loaded evaluation keys may hold together, least recently used evicted "
                        "first (default 4G)")
    p.add_argument("--max-keys", type=int, default=protocol.DEFAULT_MAX_KEYS, metavar="N",
                   help=f"key sets registered at once, all clients (default {protocol.DEFAULT_MAX_KEYS})")
    p.add_argument("--max-keys-per-client", type=int, default=protocol.DEFAULT_MAX_KEYS_PER_CLIENT, metavar="N",
                   help="key sets registered at once from one client address; a client's next registration evicts "
                        f"its own least recently used set (default {protocol.DEFAULT_MAX_KEYS_PER_CLIENT})")
    p.add_argument("--key-ttl", type=float, default=protocol.DEFAULT_KEY_TTL, metavar="SECONDS",
                   help="forget keys unused for this long (default 3600)")
    lim = p.add_argument_group("connections and uploads (memory bounded by design; docs/service.md)")
    lim.add_argument("--max-uploads", type=int, default=protocol.DEFAULT_MAX_UPLOADS, metavar="N",
                     help="requests with a body (keys, inference, batch) in progress at once; more wait for a slot "
                          f"(default {protocol.DEFAULT_MAX_UPLOADS})")
    lim.add_argument("--upload-wait", type=float, default=protocol.DEFAULT_UPLOAD_WAIT, metavar="SECONDS",
                     help="how long a request waits for an upload slot before 503 busy with Retry-After "
                          f"(default {protocol.DEFAULT_UPLOAD_WAIT:g})")
    lim.add_argument("--header-timeout", type=float, default=protocol.DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                     help="a connection must send a complete request head this soon, else 408 and closed "
                          f"(default {protocol.DEFAULT_HEADER_TIMEOUT:g})")
    lim.add_argument("--body-timeout", type=float, default=protocol.DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                     help="longest stall between two chunks of a body (bodies must also average "
                          f"{protocol.MIN_BODY_RATE >> 10} KiB/s after that long), else 408 (default "
                          f"{protocol.DEFAULT_BODY_TIMEOUT:g})")
    lim.add_argument("--max-connections", type=int, default=protocol.DEFAULT_MAX_CONNECTIONS, metavar="N",
                     help="open connections; the next gets 503 and is closed (default "
                          f"{protocol.DEFAULT_MAX_CONNECTIONS})")
    lim.add_argument("--drain-timeout", type=float, default=protocol.DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
                     help="on SIGTERM, answer requests in flight for up to this long while new ones get 503 "
                          f"shutting_down (default {protocol.DEFAULT_DRAIN_TIMEOUT:g}; 0: stop at once)")
    lim.add_argument("--max-batch-key-bytes", type=_size, default=protocol.DEFAULT_MAX_BATCH_KEY_BYTES,
                     metavar="BYTES", help="memory all batch-mode key sets hold together once loaded, least "
                                           "recently used evicted first (default 256M)")
    p.add_argument("--ssl-certfile", help="TLS certificate (PEM); with --ssl-keyfile serves https")
    p.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    ray = p.add_argument_group("scale-out on Ray (optional extra: pip install -e \".[ray]\"; docs/scale-out.md)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run inference in Ray actors across the cluster whose head is at ADDRESS (host:port, or "
                          "auto); without ADDRESS a one-node Ray on this machine. --workers does not apply")
    ray.add_argument("--ray-actors", type=int, metavar="N",
                     help="--ray: inference actors in all (default: one per free CPU of the cluster at start)")
    ray.add_argument("--ray-actors-per-node", type=int, metavar="K",
                     help="--ray: instead, K actors on every node, also on nodes that join later")
    ray.add_argument("--ray-cpus", type=int, default=1, metavar="C",
                     help="--ray: CPUs each actor reserves and evaluates with (default 1)")
    ray.add_argument("--ray-replicas", action="append", default=[], metavar="MODEL=N[,MODEL=N...]",
                     help="--ray: N dedicated actors for MODEL that hold only it (repeatable); unlisted models share "
                          "the actors that --ray-actors / --ray-actors-per-node / one per free CPU place")
    add_operations_arguments(p, default_level="info")
    p.add_argument("--audit-log", metavar="PATH",
                   help="append one JSON line per key registration, inference, batch and refused request (time, "
                        "key id, client, model@version, route, outcome, bytes; never an image, ciphertext or key)")
    add_config_argument(p)
    p.set_defaults(handler=run)


def add_operations_arguments(p: argparse.ArgumentParser, default_level: str) -> None:
    """--log-level, --log-format, --log-file: shared by ``serve`` and ``ui``."""
    from medhe.service.logs import FORMATS

    p.add_argument("--log-level", default=default_level, choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--log-format", default="text", choices=FORMATS,
                   help="text (default) or json: one JSON object per line (time, level, logger, message, event)")
    p.add_argument("--log-file", metavar="PATH", help="append the log to this file (default: stderr)")


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 65536, 64M, 2G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError("size must be positive")
    return int(value)


def _enc(model) -> str:
    return ", encrypted weights" if model.ref.encrypted else ""


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MedheError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            import errno

            if exc.errno == errno.EADDRNOTAVAIL:  # the address is not one of this machine's interfaces
                raise MedheError(f"--host {host} is not an address of this machine ({exc.strerror}): use 127.0.0.1, "
                                 "0.0.0.0 (all interfaces) or one of this machine's addresses") from None
            if exc.errno == errno.EACCES:
                raise MedheError(f"no permission to listen on {host}:{port} ({exc.strerror}): use a --port above "
                                 "1023") from None
            raise MedheError(f"cannot listen on {host}:{port} ({exc.strerror}): is another server running there? "
                             "choose another --port") from None


def _exit_on_sigterm() -> None:
    """SIGTERM (systemd, docker stop, kill) ends the server like Ctrl-C: workers stopped and waited for.

    uvicorn handles SIGTERM while it runs and, once shut down, raises the signal again with the handler that was
    installed before it started. Python's default for SIGTERM kills the process on the spot, which used to leave
    worker processes and the multiprocessing resource tracker running (issue #16, fault 1); this handler turns it
    into SystemExit, so the ``finally`` below runs. The same holds while the models compile, before uvicorn runs.
    """
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    from medhe.service.logs import configure, reset

    say = configure(args.log_format, args.log_file, args.log_level)
    try:
        return _serve(args, say)
    finally:
        reset()  # logging as it was: the command may run inside another program (the tests)


def _serve(args: argparse.Namespace, say) -> int:
    import uvicorn

    from medhe.service.audit import AuditLog
    from medhe.service.catalog import load_catalog, load_encrypted_catalog
    from medhe.service.server import create_app
    from medhe.service.worker import default_processes

    token = args.token if args.token is not None else os.environ.get(protocol.TOKEN_ENV) or None
    pool_factory = ray_pool_factory(args)  # --ray without Ray installed: one line, before anything else
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise MedheError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for path in (args.ssl_certfile, args.ssl_keyfile):
        if path and not os.path.isfile(path):
            raise MedheError(f"TLS file not found: {path}")
    if not 0 < args.port < 65536:
        raise MedheError(f"--port {args.port} is not a valid TCP port")
    if args.host not in LOOPBACK and not token:
        say(f"warning: serving on {args.host} without --token: anyone who can reach it may use your models",
            "no_token", logging.WARNING)
    if args.host not in LOOPBACK and not args.ssl_certfile:
        say("warning: no TLS: put medhe behind a TLS proxy or pass --ssl-certfile/--ssl-keyfile", "no_tls",
            logging.WARNING)
    _check_port_free(args.host, args.port)  # fail now, not after minutes of compiling
    if not args.model and not args.encrypted_model:
        raise MedheError("nothing to serve: pass --model NAME|DIR[:SCHEME] or --encrypted-model ENCDIR")
    ckks_options = {"key_switching": args.key_switching} if args.key_switching else {}
    models = load_catalog(args.model, ckks_options) if args.model else []
    models += load_encrypted_catalog(args.encrypted_model, models)
    workers = default_processes() if args.workers is None else args.workers
    if workers < 0:
        raise MedheError("--workers must be 0 (threads) or a positive number of processes")
    if args.max_keys < 1 or args.max_keys_per_client < 1:
        raise MedheError("--max-keys and --max-keys-per-client must be at least 1")
    if args.max_uploads < 1 or args.max_connections < 1:
        raise MedheError("--max-uploads and --max-connections must be at least 1")
    for flag, value in (("--upload-wait", args.upload_wait), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout)):
        if not value > 0:
            raise MedheError(f"{flag} must be a positive number of seconds")
    if args.drain_timeout < 0:
        raise MedheError("--drain-timeout must be 0 (stop at once) or a positive number of seconds")
    where = f"{workers or 'in-process'} worker(s)"
    if pool_factory is not None:
        where = f"Ray actors ({args.ray or 'local Ray'})"
    audit = AuditLog(args.audit_log) if args.audit_log else None  # an unwritable path: one line, now
    app = create_app(models, token=token, max_body=args.max_body, key_ttl=args.key_ttl,
                     max_key_bytes=args.max_key_bytes, processes=workers, max_keys=args.max_keys,
                     max_keys_per_client=args.max_keys_per_client, max_batch_bytes=args.max_batch_bytes,
                     pool_factory=pool_factory, audit=audit, max_uploads=args.max_uploads,
                     upload_wait=args.upload_wait, body_timeout=args.body_timeout,
                     max_batch_key_bytes=args.max_batch_key_bytes)
    _exit_on_sigterm()
    if pool_factory is not None:
        from medhe.service.raycluster import connect

        connect(args.ray or None)  # a wrong or unreachable address is one line, before any compiling
    scheme = "https" if args.ssl_certfile else "http"
    say(f"medhe serve: compiling {', '.join(f'{m.id} ({m.ref.scheme}{_enc(m)})' for m in models)} "
        f"in {where} ...", "compiling", models=[m.id for m in models])
    from medhe.service.connections import guarded_protocol
    from medhe.service.drain import DrainingServer

    try:
        app.state.start()  # compile errors are one-line MedheErrors here, before the port is bound
        if pool_factory is not None:
            per_model = app.state.pool.live_by_model()
            say("medhe serve: Ray actors per model: " + ", ".join(f"{m} {n}" for m, n in per_model.items()),
                "ray_actors", actors=per_model)
        url = f"{scheme}://{args.host}:{args.port}{protocol.PREFIX}"
        say(f"medhe serve: ready at {url}  (Ctrl-C stops)", "ready", url=url)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                                timeout_keep_alive=30, timeout_graceful_shutdown=5,
                                http=guarded_protocol(args.header_timeout, args.max_connections),
                                log_config=None)  # logging is set up above (--log-format, --log-file)
        server = DrainingServer(config, app.state.admission, args.drain_timeout)
        server.run()
    finally:
        app.state.stop()  # every worker stopped and waited for, however we got here
        if pool_factory is not None:
            from medhe.service.raycluster import disconnect

            disconnect()
        if audit is not None:
            audit.close()
    if not server.started:
        raise MedheError(f"the server did not start on {args.host}:{args.port} (port in use, or models failed "
                         "to compile; see the log above)")
    return 0


def ray_pool_factory(args: argparse.Namespace):
    """``--ray``: a factory of ``RayPool`` for ``create_app`` (``None`` without it); a one-line error naming the
    extra to install when Ray is missing, before anything is compiled."""
    replicas = parse_replicas(args.ray_replicas)
    if args.ray is None:
        if args.ray_actors is not None or args.ray_actors_per_node is not None or replicas:
            raise MedheError("--ray-actors, --ray-actors-per-node and --ray-replicas go with --ray")
        return None
    from medhe.service.raycluster import require_ray

    require_ray()
    if args.ray_actors is not None and args.ray_actors_per_node is not None:
        raise MedheError("give --ray-actors N or --ray-actors-per-node K, not both")
    for flag, value in (("--ray-actors", args.ray_actors), ("--ray-actors-per-node", args.ray_actors_per_node),
                        ("--ray-cpus", args.ray_cpus)):
        if value is not None and value < 1:
            raise MedheError(f"{flag} must be at least 1")
    from medhe.service.raypool import RayPool

    def factory(refs, key_cache_bytes, on_replace):
        return RayPool(refs, key_cache_bytes, on_replace, actors=args.ray_actors,
                       per_node=args.ray_actors_per_node, cpus=args.ray_cpus, replicas=replicas)

    return factory


def parse_replicas(values: list[str]) -> dict[str, int]:
    """``--ray-replicas`` values (``MODEL=N``, comma-separated, the flag repeatable) as model id -> N; a one-line
    error for a malformed item, a count below one, or a model given twice. Model names are checked against the
    served models once they are loaded (``raypool.check_replicas``)."""
    replicas: dict[str, int] = {}
    for value in values:
        for item in value.split(","):
            model_id, sep, count = item.strip().partition("=")
            model_id, count = model_id.strip(), count.strip()
            if not sep or not model_id or not count.lstrip("-").isdigit():
                raise MedheError(f"--ray-replicas {item.strip()!r} is not MODEL=N (e.g. --ray-replicas "
                                 "pneumoniamnist=2,breastmnist=1)")
            if int(count) < 1:
                raise MedheError(f"--ray-replicas {model_id}={count}: each model needs at least 1 actor; leave the "
                                 "model out to put it on the default actors")
            if model_id in replicas:
                raise MedheError(f"--ray-replicas lists {model_id} twice; give each model one count")
            replicas[model_id] = int(count)
    return replicas
