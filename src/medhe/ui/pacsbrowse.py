"""The page's window on the hospital's PACS (``medhe ui --pacs URL``): find chest X-ray studies, open one's images.

Why the page names studies by ref (``medhe.pacs.privacy``) and never sends Study Instance UIDs to the browser: the
browser only needs something to click, and the UIDs stay in this process, in a bounded map filled by searches.
Opened images go into the page's scan store like dropped files, so diagnosing them is the page's ordinary path
(input checks, encryption here, the server sees ciphertexts). Nothing is written into the PACS from the page:
reports go back through ``medhe pacs diagnose``, which owns the SR/FHIR bookkeeping.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from medhe.errors import MedheError
from medhe.pacs.dicomweb import Pacs, check_date
from medhe.pacs.privacy import study_ref
from medhe.pacs.workflow import already_reported, study_images

MAX_STUDIES = 50  # rows one search shows (each costs a series query for its "reported" flag)
MAX_REFS = 1000  # refs this process remembers from searches


class UnknownStudy(MedheError):
    """A ref no recent search of this page returned."""


class PacsBrowser:
    def __init__(self, pacs: Pacs) -> None:
        self.pacs = pacs
        self._uids: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def _remember(self, uid: str) -> str:
        ref = study_ref(uid)
        with self._lock:
            self._uids[ref] = uid
            self._uids.move_to_end(ref)
            while len(self._uids) > MAX_REFS:
                self._uids.popitem(last=False)
        return ref

    def search(self, patient: str | None = None, date: str | None = None, accession: str | None = None
               ) -> dict[str, Any]:
        """Chest X-ray (CR/DX) studies matching every given field, newest first, at most ``MAX_STUDIES``."""
        check_date(date or None, "the study date")
        if not (patient or date or accession):
            raise MedheError("give a patient ID, a study date or an accession number to search the PACS")
        studies = self.pacs.search_cxr_studies(patient=patient or None, date=date or None,
                                               accession=accession or None)
        studies = sorted(studies, key=lambda s: (s.date, s.time), reverse=True)
        rows = [{"ref": self._remember(st.uid), "date": st.date, "time": st.time, "modalities": st.modalities,
                 "images": st.instances, "reported": already_reported(self.pacs.series(st.uid))}
                for st in studies[:MAX_STUDIES]]
        return {"pacs": self.pacs.url, "studies": rows, "more": len(studies) > MAX_STUDIES}

    def images(self, ref: str) -> list[tuple[str, Any]]:
        """(name, pixels) of every chest X-ray image of the study ``ref``, checked as medhe pacs checks them."""
        with self._lock:
            uid = self._uids.get(ref)
        if uid is None:
            raise UnknownStudy(f"study {ref} is not among this page's PACS search results; search again")
        pairs = study_images(self.pacs, uid)
        return [(f"study {ref} image {i}", image) for i, (_, image) in enumerate(pairs, 1)]
