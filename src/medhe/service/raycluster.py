"""Reaching a Ray cluster: the optional import, the driver connection, and a local cluster of real nodes.

Ray is an optional extra (``pip install -e ".[ray]"``): every entry point asks ``require_ray`` first, so a
machine without it gets one line saying what to install. ``LocalCluster`` starts real ``ray start`` nodes on
loopback addresses (tests, ``medhe bench --service --ray`` without an address) and always stops exactly the
processes it started.

Ray rewrites ``127.0.0.1`` to the machine's outward address (so other machines could reach it); other loopback
addresses (127.0.0.2, 127.0.0.3, ...) it keeps, so a local cluster puts each node on its own one of those: every
connection stays on this machine. (Ray's gRPC servers still listen on every interface; see docs/scale-out.md.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medhe.errors import MedheError

INSTALL_HINT = 'Ray is not installed: pip install -e ".[ray]" (or pip install "ray==2.60.0")'
LOCAL_HEAD_IP = "127.0.0.2"  # loopback, but not one Ray rewrites to the outward address
# Ray sends a call's argument or result inline in the gRPC call only up to 100 KiB; anything larger goes through the
# object stores (a put on the caller's node, a pull by the raylets, a get on the callee's). An encrypted image
# (~1.2 MB for pneumoniamnist) and its result (~0.1-0.3 MB) then cost more of Ray's CPU than of the transfer: on
# the 2-core benchmark the raylets used ~1.2 s and the web process +0.5 s per 256 requests, 10 times less inline.
# Up to 4 MiB goes inline here (Ray's per-call cap of inlined bytes is 10 MiB); larger ciphertexts and every key
# upload (``ray.put``) still use the object store. A value set by the operator is kept.
INLINE_ENV = {"RAY_max_direct_call_object_size": str(4 << 20)}


def inline_env() -> dict[str, str]:
    """``INLINE_ENV`` with whatever the operator already set in this process's environment."""
    return {name: os.environ.get(name, value) for name, value in INLINE_ENV.items()}


def require_ray() -> Any:
    """The ``ray`` module, or a one-line ``MedheError`` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MedheError(INSTALL_HINT) from None
    return ray


def node_ip_for(address: str) -> str | None:
    """The driver's node address for a cluster at ``address``: a local loopback cluster's own address (Ray would
    otherwise look for a raylet on the outward address), else ``None`` (Ray finds it)."""
    host = address.rsplit(":", 1)[0]
    return host if host.startswith("127.") else None


def connect(address: str | None, namespace: str = "medhe") -> Any:
    """Join the cluster at ``address`` (``host:port`` of the head, or ``auto``) as a driver; ``None``: start a
    one-node Ray inside this process (all cores of this machine). Idempotent."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    os.environ.update(inline_env())  # read by this process's Ray core worker when it starts (ray.init)
    options: dict[str, Any] = {"namespace": namespace, "log_to_driver": False, "configure_logging": False}
    if address is None:
        options["include_dashboard"] = False
    else:
        _check_reachable(address)
        options["address"] = address
        ip = node_ip_for(address)
        if ip:
            options["_node_ip_address"] = ip
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local Ray instance"
        raise MedheError(f"cannot join the Ray cluster at {where} ({str(exc).splitlines()[0][:200]}); start it with "
                         "`ray start --head` and pass its address (host:port)") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """One TCP connect to the head's GCS port first: Ray itself retries an unreachable address for minutes."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise MedheError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379, the head's `ray start "
                         "--head --port`), nor auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise MedheError(f"no Ray head answers at {address} ({exc.strerror or type(exc).__name__}): start it with "
                         "`ray start --head` there, or check the address and the firewall") from None


def disconnect() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def alive_nodes() -> dict[str, dict]:
    """Node id -> Ray's record of every node the cluster counts as alive."""
    ray = require_ray()
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    if exe.exists():
        return str(exe)
    found = shutil.which("ray")
    if not found:
        raise MedheError(f"the `ray` command was not found next to {sys.executable} nor on PATH; {INSTALL_HINT}")
    return found


def _processes_under(marker: str) -> list[int]:
    """Live processes whose command line names ``marker`` (a node's private temp folder), plus their children
    (Ray's agents and workers rename themselves, but are children of the node's raylet)."""
    from medhe.service.launch import _cmdline, descendants

    roots = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid != os.getpid() and marker in _cmdline(pid):
            roots.append(pid)
    out = list(roots)
    for pid in roots:
        out.extend(descendants(pid))
    return sorted(set(out))


class LocalNode:
    """One ``ray start`` node on this machine, with its own temp folder so its processes can be found and
    stopped (or killed, to simulate a machine failure) without touching any other Ray node."""

    def __init__(self, ip: str, temp_dir: str, head: bool):
        self.ip, self.temp_dir, self.head = ip, temp_dir, head

    def pids(self) -> list[int]:
        return _processes_under(self.temp_dir)

    def kill(self) -> int:
        """SIGKILL every process of this node at once (a machine that lost power); returns how many."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)


class LocalCluster:
    """``with LocalCluster(nodes=2, cpus_per_node=1) as c: c.address`` — a head and ``nodes - 1`` more nodes,
    each a real ``ray start`` on its own loopback address, every process stopped when the block ends.

    ``object_store_bytes`` per node stays small (the key sets and ciphertexts that pass through it are MBs;
    Ray spills to disk beyond it). ``env``: extra environment for the nodes (their workers inherit it).
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = 128 << 20,
                 env: dict[str, str] | None = None, timeout: float = 120.0):
        if nodes < 1:
            raise MedheError("a local Ray cluster needs at least one node")
        self.n_nodes, self.cpus = nodes, cpus_per_node
        self.object_store_bytes = max(int(object_store_bytes), 80 << 20)
        self.env = {**os.environ, **(env or {})}
        src = str(Path(__file__).resolve().parents[2])  # workers import medhe from where this copy lives
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (src, self.env.get("PYTHONPATH", "")) if p)
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.timeout = timeout
        self.root = tempfile.mkdtemp(prefix="medhe-ray-")
        self.nodes: list[LocalNode] = []
        self._watchdog: subprocess.Popen | None = None
        from medhe.service.launch import free_port

        self.port = free_port("127.0.0.1")
        self.address = f"{LOCAL_HEAD_IP}:{self.port}"

    def _start(self, node: LocalNode, extra: list[str]) -> None:
        os.makedirs(node.temp_dir, exist_ok=True)
        cmd = [_ray_cli(), "start", "--node-ip-address", node.ip, "--num-cpus", str(self.cpus), "--num-gpus", "0",
               "--object-store-memory", str(self.object_store_bytes), "--temp-dir", node.temp_dir,
               "--disable-usage-stats", *extra]
        self.nodes.append(node)  # before starting: a start that half-succeeds is still cleaned up
        try:
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise MedheError(f"`ray start` for {node.ip} did not finish in {self.timeout:.0f} s") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise MedheError(f"`ray start` for {node.ip} failed: {' | '.join(tail)}")

    def start(self) -> "LocalCluster":
        os.makedirs(self.root, exist_ok=True)
        # A watchdog kills the nodes if this process dies without stop() (SIGKILL, the OOM killer): `ray start`
        # detaches its processes, which would otherwise run on, holding ports and memory.
        self._watchdog = subprocess.Popen([sys.executable, "-m", "medhe.service.raycluster", str(os.getpid()),
                                           self.root], env=self.env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._start(LocalNode(LOCAL_HEAD_IP, os.path.join(self.root, "head"), True),
                        ["--head", "--port", str(self.port), "--include-dashboard=false"])
            for i in range(1, self.n_nodes):
                self._start(LocalNode(f"127.0.0.{2 + i}", os.path.join(self.root, f"node{i}"), False),
                            ["--address", self.address])
            self._wait_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_nodes(self) -> None:
        """Until the head counts every node alive (a node registers a moment after ``ray start`` returns)."""
        ray = require_ray()
        deadline = time.monotonic() + self.timeout
        fresh = not ray.is_initialized()
        if fresh:
            connect(self.address)
        try:
            while len(alive_nodes()) < self.n_nodes:
                if time.monotonic() > deadline:
                    raise MedheError(f"only {len(alive_nodes())} of {self.n_nodes} local Ray nodes came up")
                time.sleep(0.2)
        finally:
            if fresh:
                disconnect()

    def add_node(self) -> LocalNode:
        """One more node joining the running cluster (as an autoscaler would add one)."""
        i = len(self.nodes)
        node = LocalNode(f"127.0.0.{2 + i}", os.path.join(self.root, f"node{i}"), False)
        self._start(node, ["--address", self.address])
        self.n_nodes += 1
        return node

    def kill_node(self, index: int = -1) -> int:
        """Kill one node that is not the head (default: the last) outright; returns how many processes died."""
        node = self.nodes[index]
        if node.head:
            raise MedheError("refusing to kill the head node: the cluster would be gone, not degraded")
        return node.kill()

    def stop(self) -> None:
        """Kill every process of every node (workers first, the head last), then remove the temp folders."""
        for node in reversed(self.nodes):
            for _ in range(3):
                if not node.kill():
                    break
                time.sleep(0.3)
        self.nodes = []
        shutil.rmtree(self.root, ignore_errors=True)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog.poll() is None:
            watchdog.kill()
            watchdog.wait(5)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _watch(parent: int, root: str) -> None:
    """The watchdog's loop: once ``parent`` is gone, kill every process of the cluster under ``root``; once
    ``root`` is gone (a normal stop), just exit."""
    while os.path.isdir(root):
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            for _ in range(3):
                pids = _processes_under(root)
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if not pids:
                    break
                time.sleep(0.3)
            shutil.rmtree(root, ignore_errors=True)
            return
        time.sleep(1.0)


if __name__ == "__main__":  # python -m medhe.service.raycluster PARENT_PID ROOT (started by LocalCluster.start)
    _watch(int(sys.argv[1]), sys.argv[2])
