"""``medhe ui``: the clinician's page on this computer; it encrypts here and asks a remote ``medhe serve``."""

from __future__ import annotations

import argparse
import os

from medhe.cli._config import add_config_argument
from medhe.cli.serve import add_operations_arguments
from medhe.errors import MedheError
from medhe.service import protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="local web page for clinicians: encrypt here, diagnose on a medhe server",
                       description="Start a web page on 127.0.0.1 for clinicians. Scans are preprocessed and "
                                   "encrypted in this process, which holds the secret key; the server only sees "
                                   "public keys and ciphertexts. Open the printed address in a browser.")
    p.add_argument("--server", required=True, metavar="URL", help="the medhe server, e.g. http://10.0.0.5:8000")
    p.add_argument("--port", type=int, default=8765, help="local port of the page (default 8765)")
    p.add_argument("--token", help=f"bearer token of the server (default: ${protocol.TOKEN_ENV})")
    p.add_argument("--cacert", help="CA bundle to verify the server's self-signed TLS certificate")
    p.add_argument("--pacs", metavar="URL",
                   help="DICOMweb root of the hospital's PACS (e.g. http://127.0.0.1:8042/dicom-web): the page can "
                        "then search chest X-ray studies and open their images; credentials as for medhe pacs "
                        "($MEDHE_PACS_PASSWORD with --pacs-user, or $MEDHE_PACS_TOKEN)")
    p.add_argument("--pacs-user", metavar="USER", help="HTTP basic authentication user at the PACS")
    p.add_argument("--pacs-cacert", metavar="FILE", help="CA bundle to verify the PACS's TLS certificate")
    p.add_argument("--scan-store-mb", type=int, default=512, metavar="MB",
                   help="decoded scans the page keeps in memory, in MB of pixels (default 512); the oldest are "
                        "dropped beyond it or beyond 64 scans")
    add_operations_arguments(p, default_level="warning")
    add_config_argument(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medhe.service.logs import configure, reset

    say = configure(args.log_format, args.log_file, args.log_level)
    try:
        return _ui(args, say)
    finally:
        reset()  # logging as it was: the command may run inside another program (the tests)


def _pacs(args: argparse.Namespace):
    """The PACS of --pacs, or None. Its packages are the pacs extra's, named in one line when missing."""
    if not args.pacs:
        if args.pacs_user or args.pacs_cacert:
            raise MedheError("--pacs-user and --pacs-cacert need --pacs URL")
        return None
    from medhe.cli.pacs import open_pacs

    return open_pacs(args.pacs, args.pacs_user, args.pacs_cacert, command="medhe ui --pacs")


def _ui(args: argparse.Namespace, say) -> int:
    import uvicorn

    from medhe.cli.serve import _check_port_free
    from medhe.ui.app import create_ui_app

    if not 0 < args.port < 65536:
        raise MedheError(f"--port {args.port} is not a valid TCP port")
    token = args.token if args.token is not None else os.environ.get(protocol.TOKEN_ENV) or None
    if args.cacert and not os.path.isfile(args.cacert):
        raise MedheError(f"CA bundle not found: {args.cacert}")
    host = "127.0.0.1"  # the page holds the secret key: never reachable from another machine
    _check_port_free(host, args.port)
    if args.scan_store_mb < 1:
        raise MedheError(f"--scan-store-mb {args.scan_store_mb} must be at least 1")
    app = create_ui_app(args.server, token=token, verify=args.cacert or True, store_bytes=args.scan_store_mb << 20,
                        pacs=_pacs(args))
    url = f"http://{host}:{args.port}/"
    say(f"medhe ui: open {url} in a browser (server {args.server}; Ctrl-C stops)", "ready", url=url,
        server=args.server)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level=args.log_level,
                                           log_config=None))  # set up above (--log-format, --log-file)
    server.run()
    if not server.started:
        raise MedheError(f"medhe ui did not start on {host}:{args.port}; see the log above")
    return 0
