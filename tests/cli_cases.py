"""Many ``medhe`` command lines run in one fresh interpreter, each result like ``subprocess.run``'s.

Each ``python -m medhe`` pays ~5 s of imports (torch, Ray) before it can print its one-line error; the tests that
check 8-13 such errors spent over two minutes importing. One child process runs them all in turn through
``medhe.cli.main`` (the entry point ``python -m medhe`` calls), each with its own stdout and stderr, an argparse
exit caught as its status, and an uncaught exception as a traceback on its stderr with status 1 (as Python prints
it), so the assertions read what a user's terminal would.
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import contextlib, io, json, sys, traceback
from medhe.cli import main
out = []
for argv in json.load(sys.stdin):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    out.append([int(rc or 0), o.getvalue(), e.getvalue()])
sys.__stdout__.write("\n@@CASES@@" + json.dumps(out))
"""


def run_cases(cases: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=timeout)
    marker = done.stdout.rfind("\n@@CASES@@")
    assert done.returncode == 0 and marker >= 0, f"the case runner failed:\n{done.stderr[-3000:]}"
    results = json.loads(done.stdout[marker + len("\n@@CASES@@"):])
    return [subprocess.CompletedProcess(["medhe", *argv], rc, out, err)
            for argv, (rc, out, err) in zip(cases, results)]
