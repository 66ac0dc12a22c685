"""The page's backend: a FastAPI app on 127.0.0.1 that serves the static page and a small JSON API for it.

Why FastAPI and a static page rather than Gradio or NiceGUI: FastAPI and uvicorn are already medhe's server
dependencies, so the page adds no package; the page is three static files (no build step, no CDN, works on an
offline hospital network); and the secret key lives in exactly one place, the ``Client`` held by this process,
which a test can watch. Scans travel from the browser to this process only (both on the same machine).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from medhe import __version__
from medhe.data import Preprocess
from medhe.data.guard import check_image, image_stats, refusal
from medhe.errors import MedheError
from medhe.service.client import calibration_for
from medhe.ui import origin, render
from medhe.ui.pipeline import Diagnoser
from medhe.ui.scans import STORE_BYTES, ScanStore, decode, display_name

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 256 << 20  # one scan file; large DICOM series frames stay well below
UPLOADS = 2  # scan uploads in flight at once (the page sends one at a time): memory <= UPLOADS x MAX_UPLOAD
#: the content type each state-changing route takes (origin.refusal refuses any other, forms included)
BODY_TYPES = {"/api/scans": "application/octet-stream", "/api/jobs": "application/json",
              "/api/pacs/search": "application/json", "/api/pacs/scans": "application/json"}
NO_PACS = "this page was started without a PACS: restart it with medhe ui --pacs URL (the PACS's DICOMweb root)"
ALLOW_UNUSUAL = "tick \"Diagnose unusual scans anyway\""


class PageError(Exception):
    """A refusal shown on the page as one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _status_handler(status: int):
    """An exception handler answering the error's one sentence with ``status``."""
    async def handler(request: Request, exc: Exception):
        return JSONResponse({"error": str(exc)}, status_code=status)

    return handler


def create_ui_app(server: str, token: str | None = None, verify: Any = True,
                  transport: httpx.BaseTransport | None = None, store_bytes: int = STORE_BYTES,
                  pacs: Any = None) -> FastAPI:
    """``pacs``: a ``medhe.pacs.dicomweb.Pacs`` the page may search and open studies from (None: files only)."""
    diagnoser = Diagnoser(server, token=token, verify=verify, transport=transport)
    browser = None
    if pacs is not None:
        from medhe.ui.pacsbrowse import PacsBrowser  # the pacs extra (dicomweb-client, highdicom) only when asked

        browser = PacsBrowser(pacs)
    scans = ScanStore(max_bytes=store_bytes)
    page_token = origin.new_token()
    index_html = (STATIC / "index.html").read_text().replace("__MEDHE_PAGE_TOKEN__", page_token)
    uploads = asyncio.Semaphore(UPLOADS)

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
    async def own_page_only(request: Request, call_next):
        """Answer only this page (``medhe.ui.origin``): its exact Host and Origin (scheme, host and port of the
        socket it was served from), and, for every state change, its token and the route's content type."""
        server_addr = request.scope.get("server") or (None, None)
        headers = request.headers
        refused = origin.refusal(request.method, headers.get("host"), headers.get("origin"),
                                 headers.get(origin.TOKEN_HEADER), headers.get("content-type"), server_addr[1],
                                 page_token, BODY_TYPES.get(request.url.path))
        if refused is not None:
            return JSONResponse({"error": refused[1]}, status_code=refused[0])
        return await call_next(request)

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(MedheError)
    async def _medhe_error(request: Request, exc: MedheError):
        return JSONResponse({"error": str(exc)}, status_code=422)

    if browser is not None:  # the PACS's own failures: it is down or refused (502), a ref no search returned (404)
        from medhe.pacs.dicomweb import PacsError
        from medhe.ui.pacsbrowse import UnknownStudy

        for kind, status in ((PacsError, 502), (UnknownStudy, 404)):
            app.add_exception_handler(kind, _status_handler(status))

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
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html, headers={"Cache-Control": "no-store"})

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
        if uploads.locked():
            raise PageError(503, f"{name}: the page is still adding {UPLOADS} other scans; add it again in a moment")
        async with uploads:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_UPLOAD:
                raise PageError(413, f"{name} is larger than {MAX_UPLOAD >> 20} MB; export a single image")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_UPLOAD:
                    raise PageError(413, f"{name} is larger than {MAX_UPLOAD >> 20} MB; export a single image")
            image = await run_in_threadpool(decode, name, bytes(body))
            del body
        scan_id = scans.add(name, image)
        return await run_in_threadpool(view, scan_id, model)

    def pacs_browser():
        if browser is None:
            raise PageError(404, NO_PACS)
        return browser

    @app.get("/api/pacs")
    async def pacs_info() -> dict:
        return {"enabled": browser is not None, "url": browser.pacs.url if browser is not None else None}

    @app.post("/api/pacs/search")
    async def pacs_search(request: Request) -> dict:
        """A POST with a JSON body, not a GET with a query: access logs record the path and query of each request,
        and a patient ID or accession number must not end up there."""
        found = pacs_browser()
        try:
            body = await request.json()
            fields = [str(body.get(k) or "").strip() for k in ("patient", "date", "accession")]
        except (ValueError, TypeError, AttributeError):
            raise PageError(400, "the page sent a malformed request; reload it") from None
        return await run_in_threadpool(found.search, *fields)

    @app.post("/api/pacs/scans")
    async def pacs_scans(request: Request) -> dict:
        found = pacs_browser()
        try:
            body = await request.json()
            ref, model_id = str(body["study"]), str(body["model"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PageError(400, "the page sent a malformed request; reload it") from None
        model_info(model_id)  # an unknown model is refused before the PACS is asked
        if uploads.locked():
            raise PageError(503, f"study {ref}: the page is still adding {UPLOADS} other scans; open it again in "
                                 "a moment")
        async with uploads:
            images = await run_in_threadpool(found.images, ref)
        views = []
        for name, image in images:
            views.append(await run_in_threadpool(view, scans.add(name, image), model_id))
        return {"scans": views}

    @app.get("/api/scans/{scan_id}")
    async def get_scan(scan_id: str, model: str) -> dict:
        return await run_in_threadpool(view, scan_id, model)

    @app.post("/api/jobs")
    async def submit(request: Request) -> dict:
        try:
            body = await request.json()
            scan_id, model_id = str(body["scan"]), str(body["model"])
            coverage = None if body.get("coverage") is None else float(body["coverage"])
            allow_unusual = body.get("allow_unusual", False)
            if not isinstance(allow_unusual, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PageError(400, "the page sent a malformed request; reload it") from None
        name, image = scans.get(scan_id)
        info = model_info(model_id)  # an unknown model is refused now, not inside the job
        calibration_for(info, coverage)  # a coverage outside (0, 1), or for an uncalibrated model: refused now
        # the input checks again, here, on the pixels this process holds: an unusual scan is refused unless the
        # clinician asked for it, and its result is then marked unreliable
        warnings = await run_in_threadpool(check_image, image, Preprocess.from_dict(info["preprocessing"]))
        if warnings and not allow_unusual:
            raise PageError(422, refusal(name, warnings, ALLOW_UNUSUAL))
        return diagnoser.submit(scan_id, name, image, model_id, coverage, warnings=warnings).to_dict()

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str) -> dict:
        found = diagnoser.job(job_id)
        if found is None:
            raise PageError(404, "this diagnosis is no longer held by the page; run it again")
        return found.to_dict()

    return app
