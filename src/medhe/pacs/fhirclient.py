"""The hospital's FHIR server as medhe pacs sees it: one transaction POST per study (``--fhir-url``).

Why a transaction of conditional creates: the SR in the PACS is what marks a study reported, and it is stored only
after the FHIR server has accepted the bundle, so a refused bundle leaves the study unreported and it is tried
again. If storing the SR fails after the FHIR server took the bundle, the retry sends the bundle again; every
resource in it carries an identifier derived from the study, the source image, the model and its version
(``medhe.pacs.fhir``) and is created only if the server holds none with it (``ifNoneExist``), so the retry does not
file a second report.
"""

from __future__ import annotations

from typing import Any

import httpx

from medhe.errors import MedheError

FHIR_JSON = "application/fhir+json"
TOKEN_ENV = "MEDHE_FHIR_TOKEN"
MAX_DETAIL = 200  # characters of OperationOutcome issue codes kept in an error line


class FhirError(MedheError):
    """The FHIR server refused or did not take the bundle; ``transient`` when it was unreachable or busy."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def _outcome_text(response: httpx.Response) -> str:
    """The status and the OperationOutcome's issue codes of a refusal. Not its free text: a FHIR server may quote
    the patient it could not match there, and this line goes to logs that must carry no patient data."""
    text = f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        codes = sorted({str(i.get("code")) for i in body.get("issue") or [] if isinstance(i, dict) and i.get("code")})
        if codes:
            text += f", issue {', '.join(codes)[:MAX_DETAIL]}"
    return text + "; the FHIR server's log has the details"


class FhirServer:
    """``FhirServer("https://fhir.hospital.example/r4")``: the base URL a transaction Bundle is POSTed to."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, verify: Any = True,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise MedheError(f"--fhir-url {url!r} is not an http(s) URL: give the FHIR server's base URL, e.g. "
                             "https://fhir.example.org/r4")
        self.url = url.rstrip("/")
        headers = {"Accept": FHIR_JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(timeout=timeout, verify=verify, headers=headers, transport=transport)

    def close(self) -> None:
        self._http.close()

    def send(self, bundle: dict[str, Any]) -> list[str]:
        """POST one transaction bundle; the per-entry statuses of the server's transaction-response (all 2xx, or
        ``FhirError``: the FHIR server then holds nothing of it, a transaction is all or nothing)."""
        try:
            response = self._http.post(self.url, json=bundle, headers={"Content-Type": FHIR_JSON})
        except httpx.TimeoutException:
            raise FhirError(f"the FHIR server at {self.url} did not answer in time; the report was not sent",
                            transient=True) from None
        except httpx.TransportError as exc:
            raise FhirError(f"cannot reach the FHIR server at {self.url} ({type(exc).__name__}); check --fhir-url "
                            "and that it is running", transient=True) from None
        if response.status_code in (401, 403):
            raise FhirError(f"the FHIR server at {self.url} refused medhe ({response.status_code}): set "
                            f"${TOKEN_ENV} to a token it accepts")
        if response.status_code >= 400:
            transient = response.status_code in (408, 429) or response.status_code >= 500
            raise FhirError(f"the FHIR server at {self.url} refused the report ({_outcome_text(response)})",
                            transient=transient)
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if not (isinstance(reply, dict) and reply.get("resourceType") == "Bundle"
                and reply.get("type") == "transaction-response"):
            raise FhirError(f"the FHIR server at {self.url} answered the transaction with something that is not "
                            "a transaction-response Bundle; check --fhir-url (the server's base URL)")
        statuses = [str((e.get("response") or {}).get("status", "")) for e in reply.get("entry") or []
                    if isinstance(e, dict)]
        if len(statuses) != len(bundle.get("entry") or []) or not all(s[:1] == "2" for s in statuses):
            raise FhirError(f"the FHIR server at {self.url} did not take every entry of the report (statuses "
                            f"{', '.join(statuses) or 'none'})")
        return statuses

    def __enter__(self) -> "FhirServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
