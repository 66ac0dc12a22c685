"""An ASGI app served by uvicorn on a free 127.0.0.1 port in a thread of the test process (the page backend, the
test FHIR server): its traffic and objects stay inspectable, and it stops when the block ends."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from medhe.service.launch import free_port


@contextmanager
def serving(app, what: str = "the app"):
    """Yields the base URL ``http://127.0.0.1:PORT`` once uvicorn has started (30 s at most)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{what} did not start on 127.0.0.1 within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
