"""Every second, the resident memory of a running server's web process and of each of its workers, and its spool.

A soak is only as good as what it watches: a leak shows as RSS that keeps growing, an upload that was not cleaned
up as a file left in the spool folder. ``MemWatch`` samples both from /proc and the file system (Linux), keeping
per-process peaks (workers come and go: a crashed or recycled one is replaced under a new pid) and a coarse
timeline for the report.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from medhe.service.spool import LOCK, PREFIX

FREE_LAG = 10.0  # seconds within which a worker has freed a key set the web process stopped counting


def rss(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of ``pid`` in bytes (0 when it is gone); ``field="VmHWM"``: its peak since it started,
    as the kernel recorded it (a one-second sample can miss a short peak; this cannot)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def spool_files(root: Path) -> list[Path]:
    """The files waiting in every spool folder under ``root`` (a server's ``$TMPDIR``), its lock file aside."""
    out = []
    for folder in root.glob(PREFIX + "*"):
        try:
            out += [p for p in folder.iterdir() if p.name != LOCK]
        except OSError:
            continue
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class MemWatch:
    """Sample ``web_pid``, ``workers()`` (a callable: the current worker pids) and the spool under ``spool_root``."""

    def __init__(self, web_pid: int, workers: Callable[[], list[int]], spool_root: Path, interval: float = 1.0,
                 timeline_every: float = 10.0, key_bytes: Callable[[], int] | None = None,
                 workers_start: int = 0):
        self.web_pid, self.workers, self.spool_root = web_pid, workers, Path(spool_root)
        self.key_bytes = key_bytes  # the server's own accounting of loaded keys (/v1/ready), sampled alongside
        self.key_bytes_peak = 0
        # workers' growth over their start (``workers_start``: their RSS then, together) beyond the keys accounted
        # at the same moment: evaluation buffers, runtimes, allocator slack (keys freed later than uncounted too)
        self.workers_start = workers_start
        self.beyond_keys_peak = 0
        # the same against the most accounted in the last FREE_LAG s: a deleted set is uncounted at once but freed
        # when its worker gets to the drop (behind the inference it runs), so this leaves out that lag
        self.beyond_lagged_peak = 0
        self._recent: deque[tuple[float, int]] = deque()
        self.at_workers_peak: dict[str, float] = {}  # accounted keys when the workers' RSS together peaked
        self.interval, self.timeline_every = interval, timeline_every
        self.samples = 0
        self.web_peak = self.web_last = 0
        self.web_hwm = 0
        self.worker_hwm: dict[int, int] = {}  # pid -> the kernel's peak RSS (VmHWM), compiling included
        self.worker_peak: dict[int, int] = {}  # pid -> peak RSS sampled
        self.worker_last: dict[int, int] = {}
        self.workers_total_peak = 0
        self.spool_peak_files = self.spool_peak_bytes = 0
        self.timeline: list[list[float]] = []  # [s, web MiB, workers MiB, spool files]
        self._t0 = time.monotonic()
        self._next_timeline = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medhe-memwatch", daemon=True)

    def start(self) -> "MemWatch":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()  # the final figures are those of the moment the watch stops

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        web = rss(self.web_pid)
        self.web_hwm = max(self.web_hwm, rss(self.web_pid, "VmHWM"))
        pids = self.workers()
        each = {pid: rss(pid) for pid in pids}
        each = {pid: v for pid, v in each.items() if v}
        for pid in each:
            self.worker_hwm[pid] = max(self.worker_hwm.get(pid, 0), rss(pid, "VmHWM"))
        files = spool_files(self.spool_root)
        spooled = sum(_size(p) for p in files)
        self.samples += 1
        self.web_last = web
        self.web_peak = max(self.web_peak, web)
        self.worker_last = each
        for pid, v in each.items():
            self.worker_peak[pid] = max(self.worker_peak.get(pid, 0), v)
        self.workers_total_peak = max(self.workers_total_peak, sum(each.values()))
        if self.key_bytes is not None:
            try:
                accounted = int(self.key_bytes())
            except Exception:  # a probe that fails once (server busy) is no reason to stop watching memory
                accounted = None
            if accounted is not None:
                now = time.monotonic()
                self._recent.append((now, accounted))
                while self._recent[0][0] < now - FREE_LAG:
                    self._recent.popleft()
                total = sum(each.values())
                self.key_bytes_peak = max(self.key_bytes_peak, accounted)
                self.beyond_keys_peak = max(self.beyond_keys_peak, total - self.workers_start - accounted)
                lagged = total - self.workers_start - max(v for _, v in self._recent)
                self.beyond_lagged_peak = max(self.beyond_lagged_peak, lagged)
                if total >= self.workers_total_peak:
                    self.at_workers_peak = {"workers_mib": mib(total), "keys_accounted_mib": mib(accounted)}
        self.spool_peak_files = max(self.spool_peak_files, len(files))
        self.spool_peak_bytes = max(self.spool_peak_bytes, spooled)
        at = time.monotonic() - self._t0
        if at >= self._next_timeline:
            self._next_timeline = at + self.timeline_every
            self.timeline.append([round(at, 1), mib(web), mib(sum(each.values())), len(files)])

    def figures(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "web_peak_mib": mib(self.web_peak), "web_hwm_mib": mib(self.web_hwm), "web_final_mib": mib(self.web_last),
            "worker_pids_seen": len(self.worker_peak),
            "worker_peak_each_mib": {str(p): mib(v) for p, v in sorted(self.worker_peak.items())},
            "worker_hwm_each_mib": {str(p): mib(v) for p, v in sorted(self.worker_hwm.items())},
            "worker_final_each_mib": {str(p): mib(v) for p, v in sorted(self.worker_last.items())},
            "workers_total_peak_mib": mib(self.workers_total_peak),
            "workers_total_final_mib": mib(sum(self.worker_last.values())),
            "spool_peak_files": self.spool_peak_files, "spool_peak_mib": mib(self.spool_peak_bytes),
            "key_bytes_accounted_peak_mib": mib(self.key_bytes_peak),
            "workers_growth_beyond_accounted_keys_peak_mib": mib(self.beyond_keys_peak),
            f"workers_growth_beyond_keys_accounted_within_{FREE_LAG:g}s_peak_mib": mib(self.beyond_lagged_peak),
            "at_workers_peak": self.at_workers_peak,
            "timeline": self.timeline,
        }


def mib(n: float) -> float:
    return round(n / (1 << 20), 1)
