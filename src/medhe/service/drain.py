"""SIGTERM drains the server instead of dropping what it is doing (issue 32, item 11).

uvicorn's own shutdown closes the listening socket and every idle keep-alive connection at once: clients whose
next request was already on its way got ``ReadError`` (13 of 64 under load), and new ones a refused connection.
``DrainingServer`` turns the first SIGTERM into a drain: the port stays open, every new request gets ``503
shutting_down`` with ``Retry-After`` and ``Connection: close`` (``admission``), requests in flight run to their
answer, and once none is left (or after ``drain_timeout`` seconds) uvicorn's normal shutdown runs, which stops the
workers and removes the spool folder. A second SIGTERM, or SIGINT (Ctrl-C), stops at once as before.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

from medhe.service.admission import AdmissionState

log = logging.getLogger("medhe.service")
MIN_DRAIN_S = 0.5  # answer 503 at least this long, so clients racing the signal learn the server is going


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: AdmissionState, drain_timeout: float):
        super().__init__(config)
        self.admission = admission
        self.drain_timeout = float(drain_timeout)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self.drain_timeout > 0 and not self.admission.draining and self.started:
            self._captured_signals.append(sig)  # re-raised after shutdown: medhe serve then exits 143 as before
            self.admission.drain()
            log.warning("medhe serve: SIGTERM: draining (%d request(s) in flight, at most %g s); new requests get "
                        "503 shutting_down", self.admission.inflight, self.drain_timeout)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        st = self.admission
        if st.draining and not self.should_exit:
            elapsed = time.monotonic() - (st.drain_started or time.monotonic())
            if (st.inflight == 0 and elapsed >= MIN_DRAIN_S) or elapsed >= self.drain_timeout:
                if st.inflight:
                    log.warning("medhe serve: drain timeout: stopping with %d request(s) still in flight",
                                st.inflight)
                self.should_exit = True
        return await super().on_tick(counter)
