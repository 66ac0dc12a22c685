"""The page's backend: a FastAPI app on 127.0.0.1 that serves the static page and a small JSON API for it.

Why FastAPI and a static page rather than Gradio or NiceGUI: FastAPI and uvicorn are already medhe's server
dependencies, so the page adds no package; the page is three static files (no build step, no CDN, works on an
offline hospital network); and the secret key lives in exactly one place, the ``Client`` held by this process,
which a test can watch. Scans travel from the browser to this process only (both on the same machine).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from medhe import __version__
from medhe.data import Preprocess
from medhe.data.guard import check_image, image_stats
from medhe.errors import MedheError
from medhe.service.client import calibration_for
from medhe.ui import render
from medhe.ui.pipeline import Diagnoser
from medhe.ui.scans import ScanStore, decode, display_name

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = 256 << 20  # one scan file; large DICOM series frames stay well below


class PageError(Exception):
    """A refusal shown on the page as one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_ui_app(server: str, token: str | None = None, verify: Any = True,
                  transport: httpx.BaseTransport | None = None) -> FastAPI:
    diagnoser = Diagnoser(server, token=token, verify=verify, transport=transport)
    scans = ScanStore()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await run_in_threadpool(diagnoser.close)

    app = FastAPI(title="medhe ui", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.diagnoser = diagnoser
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def local_only(request: Request, call_next):
        """Answer only pages of this machine: a Host other than loopback is a DNS-rebinding attempt by some web
        site (it could read scans and results), an Origin other than loopback a cross-site request."""
        origin = request.headers.get("origin")
        if request.url.hostname not in LOOPBACK_NAMES or (origin and urlsplit(origin).hostname not in LOOPBACK_NAMES):
            return JSONResponse({"error": "medhe ui answers only pages opened from this computer "
                                          "(http://127.0.0.1:PORT/)"}, status_code=403)
        return await call_next(request)

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(MedheError)
    async def _medhe_error(request: Request, exc: MedheError):
        return JSONResponse({"error": str(exc)}, status_code=422)

    def model_info(model_id: str) -> dict[str, Any]:
        try:
            diagnoser.client.models()  # the listing (cached): failing here means the server, not the request
        except MedheError as exc:
            raise PageError(502, str(exc)) from None
        return diagnoser.client.model_info(model_id)  # an unknown model: MedheError -> 422

    def view(scan_id: str, model_id: str) -> dict[str, Any]:
        name, image = scans.get(scan_id)
        pre = Preprocess.from_dict(model_info(model_id)["preprocessing"])
        return {"id": scan_id, "name": name, "model": model_id,
                "preview": render.data_url(render.model_view(image, pre)),
                "stats": image_stats(image, pre).to_dict(), "warnings": check_image(image, pre)}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/models")
    async def models(refresh: bool = False) -> dict:
        try:
            listing = await run_in_threadpool(diagnoser.models, refresh)
        except MedheError as exc:
            raise PageError(502, str(exc)) from None
        return {"server": diagnoser.client.url, "models": listing}

    @app.post("/api/scans")
    async def add_scan(request: Request, model: str) -> dict:
        name = display_name(request.headers.get("x-filename"))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD:
                raise PageError(413, f"{name} is larger than {MAX_UPLOAD >> 20} MB; export a single image")
        image = await run_in_threadpool(decode, name, bytes(body))
        scan_id = scans.add(name, image)
        return await run_in_threadpool(view, scan_id, model)

    @app.get("/api/scans/{scan_id}")
    async def get_scan(scan_id: str, model: str) -> dict:
        return await run_in_threadpool(view, scan_id, model)

    @app.post("/api/jobs")
    async def submit(request: Request) -> dict:
        try:
            body = await request.json()
            scan_id, model_id = str(body["scan"]), str(body["model"])
            coverage = None if body.get("coverage") is None else float(body["coverage"])
        except (ValueError, KeyError, TypeError):
            raise PageError(400, "the page sent a malformed request; reload it") from None
        name, image = scans.get(scan_id)
        info = model_info(model_id)  # an unknown model is refused now, not inside the job
        calibration_for(info, coverage)  # a coverage outside (0, 1), or for an uncalibrated model: refused now
        return diagnoser.submit(scan_id, name, image, model_id, coverage).to_dict()

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str) -> dict:
        found = diagnoser.job(job_id)
        if found is None:
            raise PageError(404, "this diagnosis is no longer held by the page; run it again")
        return found.to_dict()

    return app
