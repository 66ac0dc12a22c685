"""Start ``medhe serve`` as a child process on a free loopback port and wait until it is ready.

Used by the load test and the service tests: the server runs exactly as an operator would run it (its own
process, real uvicorn, real sockets), and a failed start surfaces the server's own log instead of a hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from medhe.errors import MedheError
from medhe.service import protocol


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Linux: have the kernel interrupt the server when its parent dies, so a killed test run or benchmark never
    leaves a server (and its workers' keys in memory) behind. Elsewhere: ``None`` (stop() still cleans up)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, in the parent, before fork
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def child() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGINT), 0, 0, 0)

    return child


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), read from /proc (Linux; [] elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ServerProcess:
    """``with ServerProcess(["pneumoniamnist"], workers=1) as srv: srv.url`` — a real server, stopped on exit."""

    def __init__(self, models: list[str], workers: int | None = None, token: str | None = None,
                 extra_args: list[str] | None = None, host: str = "127.0.0.1", startup_timeout: float = 300.0,
                 env: dict[str, str] | None = None):
        self.models = list(models)
        self.workers = workers
        self.token = token
        self.extra_args = list(extra_args or [])
        self.host = host
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})  # extra environment for the server (e.g. TMPDIR)
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="medhe-serve-", suffix=".log", delete=False)

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "medhe", "serve", "--host", self.host, "--port", str(self.port),
               "--log-level", "warning"]
        for model in self.models:
            cmd += ["--model", model]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        cmd += self.extra_args
        env = {**os.environ, **self.env}
        env.pop(protocol.TOKEN_ENV, None)
        if self.token:
            env[protocol.TOKEN_ENV] = self.token
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent())
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MedheError(f"medhe serve exited with status {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}{protocol.PREFIX}/ready", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise MedheError(f"medhe serve was not ready after {self.startup_timeout:.0f} s: {self.log()[-2000:]}")

    def worker_pids(self) -> list[int]:
        """The server's live inference worker processes (Linux /proc), e.g. to kill one in a crash test."""
        if self.proc is None:
            return []
        return [pid for pid in descendants(self.proc.pid)
                if "spawn_main" in _cmdline(pid) and "resource_tracker" not in _cmdline(pid)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully and the workers with it
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass
