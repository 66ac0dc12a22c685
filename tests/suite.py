"""Run the test suite as several pytest processes, one more at a time than there are cores: ``make test`` calls this.

Why not one pytest process: SEAL keeps every buffer it ever allocated in its global memory pool (seal-python gives
no way to choose another pool), so one process running all CKKS tests grew to 18.8 GB and pushed Ray's memory
monitor into killing actors of the Ray tests that came after. A process per test file (small files packed
together) gives that memory back when the file ends, and several at a time use the cores, which one pytest process
does not (most tests are single-threaded Python). One more than the cores because a test spends much of its time
waiting on a server, a subprocess or a cluster it started: on this 2-core machine two at a time kept the CPU 141 %
busy (17.2 min), three 177 % (14.4 min), the memory budget deciding as before whether the next process may start.

Scheduling uses ``tests/durations.json`` (seconds and peak RSS per file from a previous ``--record`` run): longest
files first, small ones packed into groups, and a new process only starts while the peaks of those running fit the
memory budget. Each process's output goes to a log file; a failing group's log tail is printed, and the run ends
with one summary (counts, wall time, largest process) and a non-zero exit status on any failure. Ctrl-C forwards
SIGINT to the running pytest processes (they run their finalizers, which stop any Ray cluster they started) and
ends with the summary so far.

    python tests/suite.py [--jobs N] [--record] [test files] [pytest args, e.g. -m "not slow" or -k expr]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DURATIONS = TESTS / "durations.json"
GROUP_SECONDS = 45.0  # files shorter than this are packed into groups of about this length
#: files whose recorded peak reaches this run alone even when short: SEAL's pool keeps each file's buffers in the
#: process, so two such files packed together would add their peaks (the largest process must stay <= 8 GB)
ALONE_PEAK_MB = 3000
DEFAULT_SECONDS = 20.0  # a file with no recorded duration (new) is assumed this long
DEFAULT_PEAK_MB = 3000
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


@dataclass
class Job:
    files: list[str]
    seconds: float
    peak_mb: int
    log: Path | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    wall: float = 0.0
    rc: int | None = None
    maxrss_mb: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


def _known() -> dict[str, dict]:
    try:
        return json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}


def plan_jobs(files: list[str], known: dict[str, dict]) -> list[Job]:
    """Longest first; files under GROUP_SECONDS and ALONE_PEAK_MB packed (first fit, by decreasing length) into
    groups; a file with no record counts DEFAULT_PEAK_MB, so it runs alone until a --record run has measured it."""
    est = {f: (float(known.get(f, {}).get("seconds", DEFAULT_SECONDS)),
               int(known.get(f, {}).get("peak_mb", DEFAULT_PEAK_MB))) for f in files}
    alone = {f for f in files if est[f][0] >= GROUP_SECONDS or est[f][1] >= ALONE_PEAK_MB}
    big = [Job([f], *est[f]) for f in files if f in alone]
    groups: list[Job] = []
    for f in sorted((f for f in files if f not in alone), key=lambda f: -est[f][0]):
        seconds, peak = est[f]
        target = next((g for g in groups if g.seconds + seconds <= GROUP_SECONDS), None)
        if target is None:
            groups.append(Job([f], seconds, peak))
        else:
            target.files.append(f)
            target.seconds += seconds
            target.peak_mb = max(target.peak_mb, peak)
    return sorted(big + groups, key=lambda j: -j.seconds)


def _memory_budget_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    return int(total_kb / 1024 * 0.7)


def _start(job: Job, pytest_args: list[str], logdir: Path) -> None:
    job.log = logdir / (Path(job.files[0]).stem + (f"+{len(job.files) - 1}" if len(job.files) > 1 else "") + ".log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--durations=8", *pytest_args,
           *job.files]
    with open(job.log, "wb") as out:
        # its own process group: a Ctrl-C reaches it once, forwarded by main(), not twice (terminal and main())
        job.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, process_group=0)
    job.started = time.monotonic()


def _finish(job: Job, status: int, rusage) -> None:
    job.wall = time.monotonic() - job.started
    job.rc = job.proc.returncode = os.waitstatus_to_exitcode(status)
    job.maxrss_mb = rusage.ru_maxrss // 1024
    text = job.log.read_text(errors="replace") if job.log else ""
    tail = text.strip().splitlines()[-1:] if text.strip() else [""]
    for count, kind in COUNT.findall(tail[0]):
        job.counts["errors" if kind.startswith("error") else kind] = int(count)
    job.failed = [line.split()[1] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]


def _ok(job: Job) -> bool:
    return job.rc in (0, 5)  # 5: every test of the group deselected (e.g. -m "not slow")


def _report(job: Job, done: int, total: int) -> None:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(job.counts.items())) or f"exit status {job.rc}"
    names = job.files[0] + (f" (+{len(job.files) - 1} files)" if len(job.files) > 1 else "")
    mark = "ok  " if _ok(job) else "FAIL"
    print(f"[{done:2d}/{total}] {mark} {names}: {counts} in {job.wall:.0f} s, peak {job.maxrss_mb / 1024:.1f} GB",
          flush=True)
    if not _ok(job):
        lines = job.log.read_text(errors="replace").splitlines()
        print("\n".join("    " + line for line in lines[-60:]), flush=True)
        print(f"    (whole log: {job.log})", flush=True)


def _record(jobs: list[Job]) -> None:
    """Per-file seconds and peak from this run; a group's time is split over its files by their old estimates."""
    known = _known()
    for job in jobs:
        if job.rc is None:
            continue
        weights = [float(known.get(f, {}).get("seconds", DEFAULT_SECONDS)) for f in job.files]
        for f, w in zip(job.files, weights):
            known[f] = {"seconds": round(job.wall * w / sum(weights), 1), "peak_mb": job.maxrss_mb}
    tmp = DURATIONS.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
    os.replace(tmp, DURATIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--jobs", type=int, default=min(3, (os.cpu_count() or 1) + 1),
                        help="pytest processes at once (default: cores + 1, at most 3)")
    parser.add_argument("--record", action="store_true", help=f"write this run's times and peaks to {DURATIONS.name}")
    args, pytest_args = parser.parse_known_args(argv)
    given = [a for a in pytest_args if a.endswith(".py") and Path(a).is_file()]  # `suite.py tests/test_x.py ...`
    pytest_args = [a for a in pytest_args if a not in given]
    files = ([str(Path(a).resolve()) for a in given] if given
             else sorted(str(p.relative_to(REPO)) for p in TESTS.glob("test_*.py")))
    jobs = plan_jobs(files, _known())
    budget = _memory_budget_mb()
    logdir = Path(tempfile.mkdtemp(prefix="medhe-tests-"))
    print(f"medhe tests: {len(files)} files in {len(jobs)} pytest processes, {args.jobs} at a time "
          f"(memory budget {budget / 1024:.1f} GB); logs in {logdir}", flush=True)
    t0, pending, running, done, interrupted = time.monotonic(), list(jobs), {}, [], False
    try:
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                in_use = sum(j.peak_mb for j in running.values())
                pick = next((j for j in pending if not running or in_use + j.peak_mb <= budget), None)
                if pick is None:
                    break  # wait: the next file would not fit beside what runs
                pending.remove(pick)
                _start(pick, pytest_args, logdir)
                running[pick.proc.pid] = pick
            pid, status, rusage = os.wait4(-1, 0)
            job = running.pop(pid, None)
            if job is None:
                continue
            _finish(job, status, rusage)
            done.append(job)
            _report(job, len(done), len(jobs))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping the running pytest processes (their finalizers stop Ray clusters)",
              flush=True)
        for job in running.values():
            try:
                job.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 60
        for job in running.values():
            try:
                job.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
            job.wall, job.rc = time.monotonic() - job.started, job.proc.returncode
            job.failed = [f"{' '.join(job.files)} (interrupted; log {job.log})"]
            done.append(job)
    wall = time.monotonic() - t0
    if args.record and not interrupted:
        _record(done)
    totals: dict[str, int] = {}
    for job in done:
        for k, n in job.counts.items():
            totals[k] = totals.get(k, 0) + n
    failed = [j for j in done if not _ok(j)]
    peak = max((j for j in done), key=lambda j: j.maxrss_mb, default=None)
    print("=" * 100)
    for job in failed:
        for name in job.failed or [f"{' '.join(job.files)} (exit status {job.rc}; log {job.log})"]:
            print(f"{'INTERRUPTED' if 'interrupted;' in name else 'FAILED'} {name}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(totals.items()))
    largest = f"; largest process {peak.maxrss_mb / 1024:.1f} GB ({peak.files[0]})" if peak else ""
    print(f"{summary or 'no tests ran'} in {wall:.0f} s ({wall / 60:.1f} min){largest}", flush=True)
    if interrupted:
        return 130
    return 1 if failed or len(done) < len(jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
