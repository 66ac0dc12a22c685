"""Run a real medhe command line and SIGKILL the process at one exact point of its file writes (a power cut there).

    python tests/sigkill_at.py before secret.key -- keygen --model pneumoniamnist --out KEYDIR
    python tests/sigkill_at.py after model.safetensors -- train --dataset ... --force

``before NAME``: the process kills itself just before a temp file is renamed to NAME (the data is on disk in the
temp file, e.g. ``.secret.key.abc123.tmp``); ``after NAME``: just after that rename. Nothing else is changed: the
command runs medhe's real code and is killed by a real SIGKILL, so it leaves exactly what a crash would.
"""

import os
import signal
import sys
from pathlib import Path


def main() -> int:
    when, name, sep, *args = sys.argv[1:]
    assert when in ("before", "after") and sep == "--", __doc__
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        hit = Path(os.fsdecode(dst)).name == name
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *a, **k)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    from medhe.cli import main as medhe

    return medhe(args)


if __name__ == "__main__":
    sys.exit(main())
