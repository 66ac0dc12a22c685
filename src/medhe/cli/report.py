"""``medhe report``: Markdown + PNG plots from one or more ``medhe evaluate --json`` files."""

from __future__ import annotations

import argparse

from medhe.cli._paths import output_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown report with plots from evaluate JSON files",
                       description="Write DIR/report.md with ROC curves (plain vs encrypted), an encrypted-vs-plain "
                                   "logit scatter, a latency histogram and a bytes chart per evaluation JSON.")
    p.add_argument("runs", nargs="+", metavar="RUN.json", help="files written by medhe evaluate --json")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and the PNGs")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medhe.reporting import write_report

    path = write_report(args.runs, output_dir(args.out, "--out"))
    print(f"report written to {path}")
    return 0
