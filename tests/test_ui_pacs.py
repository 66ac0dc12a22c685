"""The clinician's page with a PACS (issue 35): ``medhe ui --pacs`` against a real Orthanc with DICOMweb on 127.0.0.1
and a real ``medhe serve`` (pneumoniamnist, CKKS). Headless Chromium searches the PACS by accession number, adds the
study's image and diagnoses it under encryption; the result is the SDK's encrypted diagnosis of the same instance up
to CKKS noise, and no patient identifier or Study Instance UID reaches the browser. The page's PACS routes refuse
bad requests with one sentence each (no search fields, a bad date, a ref no search returned, a multi-frame study,
a PACS that is down, a page started without --pacs, a call without the page's token)."""

from __future__ import annotations

from contextlib import ExitStack

import httpx
import pytest

from asgi_thread import serving
from medhe.service.launch import free_port
from test_pacs import PATIENTS, _xray, make_study, orthanc, server, upload  # noqa: F401  (fixtures of test_pacs)
from test_ui import browser, css, shots, wait_for  # noqa: F401  (browser, shots: fixtures of test_ui)

pytestmark = pytest.mark.slow  # a PACS, a server, a browser and real CKKS (CI runs it)


@pytest.fixture
def page_with(server):
    """Start page backends (``create_ui_app`` as ``medhe ui`` builds it) for a PACS URL (or None); stopped after."""
    with ExitStack() as stack:
        def start(dicomweb: str | None) -> str:
            from medhe.pacs.dicomweb import Pacs
            from medhe.ui.app import create_ui_app

            app = create_ui_app(server.url, pacs=Pacs(dicomweb, timeout=10) if dicomweb else None)
            return stack.enter_context(serving(app, "medhe ui"))

        yield start


class PageClient:
    """What the page's own script sends: its origin and, on state changes, the token written into index.html."""

    def __init__(self, url: str):
        self.url = url
        html = httpx.get(url + "/").text
        self.token = html.split('name="medhe-page-token" content="', 1)[1].split('"', 1)[0]
        self.http = httpx.Client(base_url=url, headers={"Origin": url}, timeout=120)

    def get(self, path: str):
        return self.http.get(path)

    def search(self, **fields):
        return self.post("/api/pacs/search", fields)

    def post(self, path: str, body: dict, token: bool = True):
        headers = {"X-Medhe-Page-Token": self.token} if token else {}
        return self.http.post(path, json=body, headers=headers)


def test_page_finds_a_pacs_study_and_diagnoses_it_encrypted(orthanc, server, page_with, browser, shots, data_dir,
                                                            tmp_path):
    from medhe.pacs.privacy import study_ref
    from medhe.service.client import Client

    dicomweb, _ = orthanc
    study = make_study(_xray(data_dir, "PNEUMONIA", 8), 31)
    upload(dicomweb, study)
    url = page_with(dicomweb)
    ref = study_ref(study.StudyInstanceUID)

    browser.get(url)
    wait_for(browser, lambda d: css(d, ".model.selected"), "the model list")
    wait_for(browser, lambda d: d.find_element("id", "pacs").is_displayed(), "the PACS panel")
    assert browser.find_element("id", "pacs-url").text == dicomweb
    css(browser, "#pacs-accession")[0].send_keys(study.AccessionNumber)
    css(browser, "#pacs-go")[0].click()
    row = wait_for(browser, lambda d: css(d, f'#pacs-studies tr[data-ref="{ref}"]'), "the study in the search")[0]
    cells = [td.text for td in row.find_elements("css selector", "td")]
    assert cells[:5] == [ref, f"{study.StudyDate[:4]}-{study.StudyDate[4:6]}-{study.StudyDate[6:]}", "CR", "1", "-"]
    shots(browser, "pacs-1-search.png")
    row.find_element("css selector", "button").click()
    wait_for(browser, lambda d: len(css(d, ".scan img.preview")) == 1, "the study's image on the page")
    assert [e.text for e in css(browser, ".scan .name")] == [f"study {ref} image 1"]
    assert not css(browser, ".warn"), "a real radiograph must not be flagged"
    css(browser, "#diagnose")[0].click()
    wait_for(browser, lambda d: css(d, '.scan[data-state="done"]'), "the encrypted diagnosis")
    shots(browser, "pacs-2-diagnosis.png")
    (result,) = browser.execute_script("return window.medhe.results()")
    assert result["source"] == f"study {ref} image 1" and result["eval_ms"] > 0

    # the SDK, fresh keys, the same instance as a file: the same diagnosis up to CKKS noise
    local = tmp_path / "study.dcm"
    study.save_as(local, enforce_file_format=True)
    with Client(server.url) as client:
        check = client.diagnose(local)
        client.forget_keys()
    assert result["label"] == check.label
    for label, p in check.probabilities.items():
        assert abs(result["probabilities"][label] - p) < 1e-3, (label, result["probabilities"], p)

    shown = browser.page_source + str(browser.execute_script("return window.medhe.toJSON()"))
    leaked = sorted({ident for ident in PATIENTS if ident and ident in shown})
    assert not leaked, f"patient identifiers or study UIDs reached the browser: {leaked}"


def test_page_pacs_routes_refuse_with_one_sentence(orthanc, server, page_with, data_dir):
    from medhe.pacs.privacy import study_ref

    dicomweb, _ = orthanc
    multi = make_study(_xray(data_dir, "NORMAL", 9), 32, frames=2)
    upload(dicomweb, multi)
    page = PageClient(page_with(dicomweb))

    assert page.get("/api/pacs").json() == {"enabled": True, "url": dicomweb}
    r = page.search()
    assert r.status_code == 422 and r.json()["error"].startswith("give a patient ID, a study date or an accession")
    r = page.search(date="2026-12-01")
    assert r.status_code == 422 and "is not a DICOM date" in r.json()["error"]
    r = page.search(accession="NO-SUCH-ACCESSION")
    assert r.status_code == 200 and r.json()["studies"] == []

    r = page.post("/api/pacs/scans", {"study": "0123456789", "model": "pneumoniamnist"})
    assert r.status_code == 404 and r.json()["error"] == (
        "study 0123456789 is not among this page's PACS search results; search again")
    (row,) = page.search(accession=multi.AccessionNumber).json()["studies"]
    ref = study_ref(multi.StudyInstanceUID)
    assert row["ref"] == ref and row["reported"] is False
    assert page.post("/api/pacs/scans", {"study": ref, "model": "pneumoniamnist"}, token=False).status_code == 403
    assert page.post("/api/pacs/search", {"patient": "MRN1"}, token=False).status_code == 403
    r = page.post("/api/pacs/scans", {"study": ref, "model": "no-such-model"})
    assert r.status_code == 422 and "no-such-model" in r.json()["error"]
    r = page.post("/api/pacs/scans", {"study": ref, "model": "pneumoniamnist"})
    assert r.status_code == 422 and r.json()["error"].startswith(f"study {ref}: ") and "multi-frame" in r.json()["error"]
    r = page.http.post("/api/pacs/scans", content=b"study=1", headers={"X-Medhe-Page-Token": page.token,
                                                                         "Content-Type": "text/plain"})
    assert r.status_code == 415

    closed = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    r = PageClient(page_with(closed)).search(patient="MRN1")
    assert r.status_code == 502 and r.json()["error"].startswith(f"cannot reach the PACS at {closed}")

    plain = PageClient(page_with(None))
    assert plain.get("/api/pacs").json() == {"enabled": False, "url": None}
    r = plain.search(patient="MRN1")
    assert r.status_code == 404 and "restart it with medhe ui --pacs URL" in r.json()["error"]
