"""A small FHIR R4 server for the tests, on a real socket on 127.0.0.1: it takes transaction Bundles POSTed to its
base URL, validates each with fhir.resources, honours ``ifNoneExist`` on ``identifier``, and keeps what it created,
which is enough to check what ``medhe pacs --fhir-url`` sends. ``store.refuse = True`` makes it answer 422 with an
OperationOutcome that quotes the patient (as some servers do), to check that medhe does not print that text."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from asgi_thread import serving


class FhirStore:
    def __init__(self) -> None:
        self.bundles: list[dict] = []      # every transaction received, as sent
        self.resources: list[dict] = []    # every resource created
        self.refuse = False
        self.lock = threading.Lock()

    def find(self, resource_type: str, system: str, value: str) -> dict | None:
        for r in self.resources:
            if r["resourceType"] == resource_type and any(
                    i.get("system") == system and i.get("value") == value for i in r.get("identifier", [])):
                return r
        return None

    def of_type(self, resource_type: str) -> list[dict]:
        return [r for r in self.resources if r["resourceType"] == resource_type]

    def app(self) -> FastAPI:
        from fhir.resources.R4B.bundle import Bundle

        app = FastAPI()

        @app.post("/fhir")
        async def transaction(request: Request):
            body = await request.json()
            if request.headers.get("content-type") != "application/fhir+json":
                return JSONResponse({"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "not-supported", "diagnostics": "send application/fhir+json"}]},
                    status_code=415)
            try:
                Bundle.model_validate(body)
            except ValueError as exc:
                return JSONResponse({"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "structure", "diagnostics": str(exc)[:500]}]}, status_code=400)
            if self.refuse:
                patient = body["entry"][0]["resource"]["subject"]["identifier"]["value"]
                return JSONResponse({"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "not-found", "diagnostics": f"no Patient with identifier {patient}"}]},
                    status_code=422)
            out = []
            with self.lock:
                self.bundles.append(body)
                for entry in body["entry"]:
                    resource, req = entry["resource"], entry["request"]
                    cond = req.get("ifNoneExist", "")
                    found = None
                    if cond.startswith("identifier="):
                        system, _, value = cond[len("identifier="):].partition("|")
                        found = self.find(resource["resourceType"], system, value)
                    if found is None:
                        resource = {**resource, "id": str(len(self.resources) + 1)}
                        self.resources.append(resource)
                        out.append({"response": {"status": "201 Created",
                                                 "location": f"{resource['resourceType']}/{resource['id']}"}})
                    else:
                        out.append({"response": {"status": "200 OK",
                                                 "location": f"{found['resourceType']}/{found['id']}"}})
            return JSONResponse({"resourceType": "Bundle", "type": "transaction-response", "entry": out},
                                media_type="application/fhir+json")

        return app


@contextmanager
def running_fhir_server():
    """Yields (base URL, store) of a FHIR server on a free 127.0.0.1 port, stopped on exit."""
    store = FhirStore()
    with serving(store.app(), "the test FHIR server") as url:
        yield f"{url}/fhir", store
