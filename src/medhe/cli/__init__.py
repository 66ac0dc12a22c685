"""The ``medhe`` command line: one module per command group, each exposing ``register(subparsers)``.

Every user-fixable failure is a ``MedheError`` and is printed as one ``error:`` line with exit status 2 — never a
traceback. ``MEDHE_DEBUG=1`` shows the traceback for bug reports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from medhe import __version__
from medhe.errors import MedheError

#: command modules under medhe.cli, in the order they appear in --help.
COMMAND_MODULES = ("train", "evaluate", "calibrate", "demo", "bench", "serve", "predict", "ui", "pacs",
                   "experiment", "autoencoder", "encmodel", "report", "recipe", "score", "inspect", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medhe", description="Encrypted medical image diagnosis (CKKS, TFHE, Paillier).")
    parser.add_argument("--version", action="version", version=f"medhe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"medhe.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"medhe.cli.{name}":
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in == ["--version"]:  # answered before the command modules import torch (5 s otherwise)
        print(f"medhe {__version__}")
        return 0
    parser = build_parser()
    applied = None
    if any(t.startswith("--co") for t in args_in):  # serve / ui --config: a TOML file sets defaults, flags override
        from medhe.cli._config import apply_config

        try:
            applied = apply_config(parser, args_in)
        except MedheError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    if getattr(args, "config", None) != applied:
        print("error: write --config FILE in full (an abbreviated flag is not read)", file=sys.stderr)
        return 2
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    try:
        return int(args.handler(args) or 0)
    except MedheError as exc:
        if os.environ.get("MEDHE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
