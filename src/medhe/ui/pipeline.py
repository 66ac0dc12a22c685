"""One encrypted diagnosis as the page shows it: eight steps, each with its state, time and bytes.

Everything goes through the SDK's ``Client`` (key generation and registration, upload, retries); the metered
transport tells which step the SDK is in. Jobs run one at a time on one thread: a ``Client`` and its HE sessions
belong to one thread, and one diagnosis at a time is what a 2-core hospital desktop can do anyway.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from medhe.errors import MedheError
from medhe.models import metrics as _metrics  # noqa: F401  loaded now, so its import is not timed as "decrypt"
from medhe.service import protocol
from medhe.service.client import Client, calibration_for, interpret
from medhe.ui import describe, render
from medhe.ui.metered import MeteredTransport

log = logging.getLogger("medhe.ui")

STEPS = (
    ("keygen", "Generate keys (this computer)"),
    ("keys", "Send public evaluation keys"),
    ("prepare", "Preprocess the scan"),
    ("encrypt", "Encrypt the input"),
    ("upload", "Upload the ciphertext"),
    ("evaluate", "Server evaluates, encrypted"),
    ("download", "Download encrypted result"),
    ("decrypt", "Decrypt (this computer)"),
)


@dataclass
class Step:
    id: str
    title: str
    state: str = "pending"  # pending | running | done | reused | failed
    ms: float | None = None
    bytes: int | None = None
    started: float | None = None

    def start(self) -> None:
        self.state, self.started = "running", time.perf_counter()

    def finish(self, state: str = "done", nbytes: int | None = None, ms: float | None = None) -> None:
        if self.started is not None and ms is None:
            ms = (time.perf_counter() - self.started) * 1000
        self.state, self.ms = state, ms
        if nbytes is not None:
            self.bytes = nbytes

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "state": self.state,
                "ms": None if self.ms is None else round(self.ms, 1), "bytes": self.bytes}


@dataclass
class Job:
    scan: str
    name: str
    model: str
    coverage: float | None = None  # calibrated models: the prediction set's coverage (None: the record's)
    warnings: list[str] = field(default_factory=list)  # why the scan is unusual (diagnosed anyway: unreliable)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    steps: dict[str, Step] = field(default_factory=lambda: {k: Step(k, t) for k, t in STEPS})
    state: str = "queued"  # queued | running | done | failed
    error: str | None = None
    result: dict[str, Any] | None = None
    sent: int = 0
    received: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "scan": self.scan, "name": self.name, "model": self.model, "state": self.state,
                "error": self.error, "result": self.result, "sent": self.sent, "received": self.received,
                "steps": [s.to_dict() for s in self.steps.values()]}


class Diagnoser:
    """The page's one SDK client and its job queue. ``transport`` lets a test see every byte sent."""

    def __init__(self, server: str, token: str | None = None, verify: Any = True,
                 transport: httpx.BaseTransport | None = None, max_jobs: int = 256):
        self.meter = MeteredTransport(transport)
        self.client = Client(server, token=token, verify=verify, transport=self.meter)
        self.keyed: set[str] = set()  # models whose keys this page generated (cached for the session)
        self.jobs: dict[str, Job] = {}
        self.max_jobs = max_jobs
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medhe-ui")

    # -- listing -------------------------------------------------------------------------------------------------
    def models(self, refresh: bool = False) -> list[dict[str, Any]]:
        if refresh:
            self.client.refresh_models()
        return [describe.summary(info) for info in self.client.models()]

    # -- jobs ----------------------------------------------------------------------------------------------------
    def submit(self, scan_id: str, name: str, image: np.ndarray, model: str, coverage: float | None = None,
               warnings: list[str] | None = None) -> Job:
        """Queue one diagnosis; ``warnings``: the input checks' reasons, for a scan diagnosed although unusual."""
        job = Job(scan=scan_id, name=name, model=model, coverage=coverage, warnings=list(warnings or []))
        with self.lock:
            self.jobs[job.id] = job
            while len(self.jobs) > self.max_jobs:  # oldest first
                self.jobs.pop(next(iter(self.jobs)))
        self.pool.submit(self._run, job, image)
        return job

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def _run(self, job: Job, image: np.ndarray) -> None:
        job.state = "running"
        current = [None]

        def step(name: str) -> Step:
            current[0] = job.steps[name]
            return job.steps[name]

        def listener(event: str, request: httpx.Request, nbytes: int, response) -> None:
            path = request.url.path
            if event == "sending":
                job.sent += nbytes
            elif event == "received":
                job.received += nbytes
            if request.method == "POST" and path.endswith("/keys"):
                if event == "sending":
                    if job.steps["keygen"].state == "running":  # not on a re-registration after expiry
                        job.steps["keygen"].finish()
                    step("keys").start()
                    job.steps["keys"].bytes = nbytes
                elif event == "received":
                    job.steps["keys"].finish()
            elif request.method == "POST" and path.endswith("/infer"):
                if event == "sending":
                    step("upload").start()
                    job.steps["upload"].bytes = nbytes
                elif event == "sent":
                    job.steps["upload"].finish()
                    step("evaluate").start()
                elif event == "received":
                    job.steps["evaluate"].finish(ms=_eval_ms(response))  # the server's own time, else wall time
                    step("download").finish(nbytes=nbytes)  # counted as it arrived; its time is in "evaluate"

        self.meter.listener = listener
        try:
            cached = job.model in self.keyed
            keygen = step("keygen")
            keygen.start()
            sess = self.client.session(job.model)
            self.keyed.add(sess.id)
            if cached:
                keygen.finish("reused", ms=0.0)
            elif keygen.state == "running":
                keygen.finish()
            if job.steps["keys"].state == "pending":  # registered by an earlier diagnosis: nothing sent now
                job.steps["keys"].finish("reused", nbytes=sess.key_bytes, ms=0.0)
            record = calibration_for(sess.info, job.coverage)  # a bad record or coverage: before any upload
            prepare = step("prepare")
            if sess.stage is not None:
                prepare.title = "Preprocess, run the public extractor"
            prepare.start()
            x = sess.inputs(image)
            prepare.finish()
            enc = step("encrypt")
            enc.start()
            ciphertext = sess.he.encrypt(x)
            enc.finish(nbytes=len(ciphertext))
            result = self.client.infer_encrypted(sess, ciphertext)
            dec = step("decrypt")
            dec.start()
            logits = sess.he.decrypt(result)
            diagnosis = interpret(sess.info["task"], sess.info["labels"], logits, sess.id, job.name,
                                  calibration=record, coverage=job.coverage, version=sess.info.get("version"))
            dec.finish()
            summary = describe.summary(sess.info)
            job.result = {
                **diagnosis.to_dict(),
                "decision": summary["decision"], "threshold": summary["threshold"], "scheme": sess.info["scheme"],
                "eval_ms": job.steps["evaluate"].ms, "ciphertext_bytes": len(ciphertext),
                "result_bytes": len(result), "key_bytes": sess.key_bytes,
                "server_saw": render.data_url(render.ciphertext_view(ciphertext)),
                "warnings": job.warnings, "unreliable": bool(job.warnings),
            }
            job.state = "done"
        except MedheError as exc:
            self._fail(job, current[0], str(exc))
        except Exception as exc:  # a bug, not bad input: one sentence on the page, the traceback in the log
            log.exception("diagnosis of %s failed", job.name)
            self._fail(job, current[0], f"internal error ({type(exc).__name__}: {exc}); see the medhe ui log")
        finally:
            self.meter.listener = None

    @staticmethod
    def _fail(job: Job, step: Step | None, message: str) -> None:
        if step is not None and step.state in ("running", "pending"):
            step.finish("failed")
        job.error = f"{job.name}: {message}"
        job.state = "failed"

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        try:
            self.client.forget_keys()  # tidy: the server would also expire them
        except MedheError:
            pass
        self.client.close()


def _eval_ms(response: httpx.Response | None) -> float | None:
    try:
        return float(response.headers[protocol.EVAL_MS_HEADER])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
