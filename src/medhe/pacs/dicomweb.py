"""A DICOMweb client for one PACS: QIDO-RS search, WADO-RS fetch, STOW-RS store (dicomweb-client underneath).

Every failure becomes one ``MedheError`` line naming the PACS URL and what to do; ``PacsUnavailable`` marks those
worth retrying (PACS down, timed out, 5xx), which the watch loop backs off on. Requests time out
(``timeout`` seconds) rather than hang, and dicomweb-client's own retries are off: the caller decides.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from medhe.errors import MedheError

#: environment variables holding the PACS's credentials (kept off the command line)
PASSWORD_ENV = "MEDHE_PACS_PASSWORD"
TOKEN_ENV = "MEDHE_PACS_TOKEN"
#: DICOM modalities of chest radiographs: computed (CR) and digital (DX) radiography
CXR_MODALITIES = ("CR", "DX")
EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


_DATE = re.compile(r"^\d{8}(-(\d{8})?)?$|^-\d{8}$")


def check_date(value: str | None, what: str = "--date") -> str | None:
    """A DICOM date or range as QIDO-RS takes it (YYYYMMDD, A-B, A-, -B), else one line naming ``what``."""
    if value is not None and not _DATE.match(value):
        raise MedheError(f"{what} {value!r} is not a DICOM date: use YYYYMMDD or a range like 20260101-20261231")
    return value


class PacsError(MedheError):
    """The PACS refused or failed a request; ``status``: its HTTP status (0 when it never answered)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class PacsUnavailable(PacsError):
    """The PACS could not be reached or answered 5xx/timeout: worth retrying later."""


class PacsCannotTranscode(PacsError):
    """The PACS could not deliver the instances in the transfer syntax asked for."""


@dataclass
class Study:
    """The QIDO-RS study attributes medhe uses (the rest stays in the PACS)."""

    uid: str
    date: str
    time: str
    modalities: list[str]
    instances: int | None

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> "Study":
        def value(tag: str, default: Any = "") -> Any:
            values = item.get(tag, {}).get("Value") or []
            return values[0] if values else default

        mods = item.get("00080061", {}).get("Value") or []
        count = value("00201208", None)
        return cls(uid=str(value("0020000D")), date=str(value("00080020")), time=str(value("00080030")),
                   modalities=[str(m) for m in mods], instances=int(count) if count is not None else None)


def _attr(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else ""


class Pacs:
    """``Pacs("http://127.0.0.1:8042/dicom-web")``: the DICOMweb root of the hospital's PACS."""

    def __init__(self, url: str, timeout: float = 60.0, user: str | None = None, password: str | None = None,
                 token: str | None = None, verify: Any = True):
        """``user``/``password``: HTTP basic authentication; ``token``: a bearer token (never both); ``verify``:
        a CA bundle path for a PACS with a self-signed TLS certificate (as requests takes it)."""
        if not str(url).startswith(("http://", "https://")):
            raise MedheError(f"PACS URL {url!r} must start with http:// or https:// (Orthanc: "
                             "http://HOST:8042/dicom-web)")
        import requests
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter

        class _Timeout(HTTPAdapter):  # requests has no session-wide timeout; a stuck PACS must not hang medhe
            def send(self, request, **kwargs):
                kwargs["timeout"] = kwargs.get("timeout") or timeout
                return super().send(request, **kwargs)

        if token and user:
            raise MedheError("give the PACS either a user (basic authentication) or a token, not both")
        if user and password is None:
            raise MedheError(f"no password for PACS user {user!r}: set {PASSWORD_ENV} (a password is never taken "
                             "on the command line, where other users of the machine could read it)")
        session = requests.Session()
        session.verify = verify
        if user:
            session.auth = (user, password)
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        session.mount("http://", _Timeout())
        session.mount("https://", _Timeout())
        self.url = str(url).rstrip("/")
        # dicomweb-client logs request URLs, which hold study UIDs: medhe reports every failure itself, by ref
        logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL + 1)
        self._dw = DICOMwebClient(self.url, session=session)
        self._dw.set_http_retry_params(retry=False)

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        import requests
        from pydicom.errors import InvalidDicomError

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.Timeout:
            raise PacsUnavailable(f"the PACS at {self.url} did not answer {what} in time; check that it is "
                                  "running and not overloaded") from None
        except requests.exceptions.SSLError:
            raise PacsError(f"the TLS certificate of the PACS at {self.url} is not trusted ({what}); pass its "
                            "certificate or CA bundle with --pacs-cacert FILE") from None
        except requests.exceptions.ConnectionError:
            raise PacsUnavailable(f"cannot reach the PACS at {self.url} ({what}): connection failed; check "
                                  "--pacs (the DICOMweb root, e.g. http://HOST:8042/dicom-web) and that the PACS "
                                  "is running") from None
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise PacsError(f"the PACS at {self.url} refused {what} ({status}): medhe has no access; pass "
                                f"--pacs-user USER with ${PASSWORD_ENV}, or ${TOKEN_ENV}, or ask the PACS "
                                "administrator for DICOMweb access from this machine", status) from None
            if status == 404:
                raise PacsError(f"the PACS at {self.url} has no such resource ({what}, 404); check --pacs (the "
                                "DICOMweb root, e.g. http://HOST:8042/dicom-web) and the study") from None
            cls = PacsUnavailable if status >= 500 or status == 429 else PacsError
            raise cls(f"the PACS at {self.url} failed {what} ({status}); see the PACS's log", status) from None
        except requests.exceptions.RequestException as exc:
            raise PacsUnavailable(f"the PACS at {self.url} failed {what} ({type(exc).__name__}); check that it "
                                  "speaks DICOMweb") from None
        except InvalidDicomError:
            raise PacsError(f"the PACS at {self.url} sent an instance that is not a DICOM Part 10 file ({what}); "
                            "it was stored without its file meta information - re-send it to the PACS as a "
                            "complete DICOM file") from None
        except ValueError:  # a body that is not DICOM JSON / multipart DICOM
            raise PacsError(f"the PACS at {self.url} sent an answer to {what} that is not DICOMweb; check --pacs "
                            "(the DICOMweb root, e.g. http://HOST:8042/dicom-web)") from None

    # -- QIDO-RS ---------------------------------------------------------------------------------------------------
    def search_studies(self, patient: str | None = None, modality: str | None = None, date: str | None = None,
                       accession: str | None = None, study: str | None = None, limit: int = 1000) -> list[Study]:
        """Studies matching every given attribute; ``date``: ``YYYYMMDD``, ``YYYYMMDD-`` or a range ``A-B``."""
        filters = {key: value for key, value in (("PatientID", patient), ("ModalitiesInStudy", modality),
                                                 ("StudyDate", date), ("AccessionNumber", accession),
                                                 ("StudyInstanceUID", study)) if value}
        found = self._call("a study search (QIDO-RS)", self._dw.search_for_studies, search_filters=filters,
                           limit=limit, fields=["ModalitiesInStudy", "NumberOfStudyRelatedInstances"])
        return [Study.from_json(item) for item in found or []]

    def search_cxr_studies(self, since: str | None = None, date: str | None = None, **filters: Any
                           ) -> list[Study]:
        """Chest X-ray studies (CR or DX in the study), one QIDO-RS query per modality, merged by UID; ``since``
        (YYYYMMDD): dated that day or later, else ``date`` as in ``search_studies``."""
        out: dict[str, Study] = {}
        for modality in CXR_MODALITIES:
            for st in self.search_studies(modality=modality, date=f"{since}-" if since else date, **filters):
                out.setdefault(st.uid, st)
        return sorted(out.values(), key=lambda s: (s.date, s.time, s.uid))

    def series(self, study_uid: str) -> list[dict[str, str]]:
        """The series of a study: uid, modality, description, manufacturer (for the already-reported check)."""
        found = self._call("a series search (QIDO-RS)", self._dw.search_for_series, study_instance_uid=study_uid,
                           fields=["SeriesDescription", "Manufacturer"])
        return [{"uid": _attr(s, "0020000E"), "modality": _attr(s, "00080060"),
                 "description": _attr(s, "0008103E"), "manufacturer": _attr(s, "00080070")} for s in found or []]

    # -- WADO-RS ---------------------------------------------------------------------------------------------------
    def fetch_series(self, study_uid: str, series_uid: str, transfer_syntax: str = EXPLICIT_LITTLE_ENDIAN
                     ) -> list:
        """Every instance of a series as pydicom datasets, asking the PACS for ``transfer_syntax`` ('*': as
        stored). ``PacsCannotTranscode`` when the PACS cannot deliver that syntax (Orthanc answers 500/406)."""
        try:
            return self._call("fetching a series (WADO-RS)", self._dw.retrieve_series, study_uid, series_uid,
                              media_types=(("application/dicom", transfer_syntax),))
        except PacsError as exc:
            if transfer_syntax != "*" and exc.status in (400, 406, 415, 500, 501) and self.reachable():
                raise PacsCannotTranscode(str(exc), exc.status) from None
            raise

    # -- STOW-RS ---------------------------------------------------------------------------------------------------
    def store(self, datasets: list) -> None:
        """Store instances in one STOW-RS request; a failed or partly refused store raises (the caller then
        knows nothing of its result counts as stored)."""
        for ds in datasets:
            if getattr(ds, "preamble", None) is None:
                ds.preamble = b"\x00" * 128  # Part 10 files: some PACSs store exactly the bytes they get
        reply = self._call("storing the report (STOW-RS)", self._dw.store_instances, datasets)
        failed = (reply or {}).get("FailedSOPSequence") if hasattr(reply, "get") else None
        if failed:
            raise PacsError(f"the PACS at {self.url} refused {len(failed)} of {len(datasets)} instances "
                            "(STOW-RS FailedSOPSequence); see the PACS's log")

    def reachable(self) -> bool:
        """Whether the PACS answers a trivial QIDO-RS query now (the watch loop's transient-or-not probe)."""
        try:
            self._call("a probe", self._dw.search_for_studies, limit=1)
            return True
        except PacsError:
            return False
