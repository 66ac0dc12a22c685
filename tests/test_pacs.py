"""``medhe pacs`` against a real Orthanc with DICOMweb on 127.0.0.1 and a real ``medhe serve`` (pneumoniamnist, CKKS).

Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``; ``make install`` adds them when root with apt) runs on a
free port with its storage in the test's folder and is killed at the end. The studies are real chest X-rays from
the shared data (Kermany, 224 px) wrapped as CR DICOMs with plausible patient and study attributes. Checked: the SR
is stored in Orthanc, parses with highdicom, references the right instance and carries exactly the decrypted
probabilities; the FHIR bundle validates with fhir.resources; watch picks up a study uploaded after it started,
once; bad input (CT, multi-frame, JPEG 2000 the PACS cannot transcode, PACS down) gives one line and writes nothing;
no line medhe prints names a patient, an accession number or a study UID.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medhe.cli import main as medhe_main
from medhe.service.launch import ServerProcess, free_port

pytestmark = pytest.mark.slow  # a PACS, a server and real CKKS (CI runs it)

ORTHANC = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
INSTALL_HINT = ("Orthanc with its DICOMweb plugin is needed: run `make install` as root (it runs "
                "`apt-get install -y orthanc orthanc-dicomweb`), or install those two Debian packages")
TODAY = date.today().strftime("%Y%m%d")
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


# -- Orthanc ------------------------------------------------------------------------------------------------------
def _found(paths) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None)


def _install_orthanc() -> None:
    """Install the two Debian packages when missing and possible (root + apt), like make install does."""
    if _found(ORTHANC) and _found(DICOMWEB_PLUGIN):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "orthanc", "orthanc-dicomweb"]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired):
        pass


@contextmanager
def running_orthanc(root: Path, **config):
    """A real Orthanc with DICOMweb on a free 127.0.0.1 port, storage under ``root``, killed on exit: yields
    (DICOMweb root URL, REST root URL). ``config``: Orthanc settings over the defaults (e.g. authentication)."""
    import httpx

    _install_orthanc()
    binary, plugin = _found(ORTHANC), _found(DICOMWEB_PLUGIN)
    if not binary or not plugin:
        pytest.fail(f"{INSTALL_HINT} (looked for {ORTHANC[0]} and {DICOMWEB_PLUGIN[0]})")
    port = free_port()
    settings = {"Name": "medhe-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                "DicomServerEnabled": False, "OrthancExplorerEnabled": False, "WebDavEnabled": False,
                "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **config}
    (root / "orthanc.json").write_text(json.dumps(settings))
    log = open(root / "orthanc.log", "wb")
    proc = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    rest = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with status {proc.returncode}: "
                            f"{(root / 'orthanc.log').read_text(errors='replace')[-1500:]}")
            try:
                if httpx.get(f"{rest}/system", timeout=2).status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("Orthanc did not answer on 127.0.0.1 within 60 s")
            time.sleep(0.2)
        yield f"{rest}/dicom-web", rest
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as urls:
        yield urls


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["pneumoniamnist"], workers=1) as srv:
        yield srv


# -- real chest X-ray DICOMs ---------------------------------------------------------------------------------------
PATIENTS = []  # every identifier a test study carries: no line medhe prints may contain any of them


def _xray(data_dir: Path, label: str, index: int) -> np.ndarray:
    files = sorted((data_dir / "kermany_pneumonia_224" / label).glob("*.jpeg"))
    return np.asarray(Image.open(files[index]).convert("L"))


def make_study(pixels: np.ndarray, n: int, modality: str = "CR", syntax: str = "1.2.840.10008.1.2.1",
               frames: int = 1, study_date: str = TODAY):
    """A real X-ray as a DICOM instance of a new study, with plausible patient, study and series attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE if modality == "CR" else CT_IMAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"Tester{n}^Alexandra"
    ds.PatientID = f"MRN{n:04d}7731"
    ds.PatientBirthDate = f"19{50 + n:02d}0{1 + n % 9}1{n % 10}"
    ds.PatientSex = "F" if n % 2 else "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = study_date
    ds.StudyTime = ds.SeriesTime = f"{8 + n % 10:02d}1530"
    ds.AccessionNumber = f"ACC{n:03d}5519"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(n), 1, 1
    ds.ReferringPhysicianName = "Referrer^Robin"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyDescription = "XR CHEST 1 VIEW" if modality == "CR" else "CT CHEST"
    ds.Manufacturer = "medhe-test"
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if syntax == "1.2.840.10008.1.2.4.90":  # JPEG 2000 lossless, a real codestream from OpenJPEG (Pillow)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG2000", irreversible=False)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    PATIENTS.extend([str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate,
                     ds.StudyInstanceUID, "Tester", "Alexandra"])
    return ds


def upload(dicomweb: str, ds) -> None:
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(dicomweb).store_instances([ds])


def series_of(dicomweb: str, study_uid: str) -> list[dict]:
    from medhe.pacs.dicomweb import Pacs

    return Pacs(dicomweb).series(study_uid)


def assert_no_phi(text: str) -> None:
    leaked = sorted({ident for ident in PATIENTS if ident and ident in text})
    assert not leaked, f"identifiers in medhe's output: {leaked}"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """A medhe command line in this interpreter (the real CLI path: one error line, exit status 2)."""
    rc = medhe_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def reported(orthanc, server, data_dir, tmp_path_factory):
    """One study diagnosed in this process through the SDK: (source dataset, outcome, second outcome, FHIR dir)."""
    from medhe.pacs.dicomweb import Pacs
    from medhe.pacs.workflow import diagnose_study
    from medhe.service.client import Client

    dicomweb, _ = orthanc
    out = tmp_path_factory.mktemp("fhir")
    source = make_study(_xray(data_dir, "PNEUMONIA", 0), 1)
    upload(dicomweb, source)
    pacs = Pacs(dicomweb)
    with Client(server.url) as client:
        outcome = diagnose_study(pacs, client, source.StudyInstanceUID, out)
        # idempotent: the SR in the PACS marks the study as reported, nothing is written twice
        again = diagnose_study(pacs, client, source.StudyInstanceUID, out)
        client.forget_keys()
    return source, outcome, again, out


# -- the tests -----------------------------------------------------------------------------------------------------
def test_diagnose_stores_sr_and_writes_fhir(orthanc, server, reported, tmp_path):
    import highdicom as hd
    from dicomweb_client.api import DICOMwebClient
    from fhir.resources.R4B.bundle import Bundle

    from medhe.pacs.privacy import study_ref
    from medhe.pacs.sr import read_sr
    from medhe.service.client import Client

    dicomweb, _ = orthanc
    source, outcome, again, out = reported
    assert outcome.status == "reported" and again.status == "skipped"
    ref = study_ref(source.StudyInstanceUID)
    assert outcome.line.startswith(f"study {ref}: ") and "SR stored" in outcome.line
    assert_no_phi(outcome.line + again.line)
    (decrypted,) = outcome.results
    assert set(decrypted.probabilities) == {"normal", "pneumonia"}
    assert abs(sum(decrypted.probabilities.values()) - 1) < 1e-9

    # the SR is in Orthanc, once, and parses with highdicom
    srs = [s for s in series_of(dicomweb, source.StudyInstanceUID) if s["modality"] == "SR"]
    assert len(srs) == 1 and srs[0]["description"] == "medhe encrypted AI diagnosis"
    (stored,) = DICOMwebClient(dicomweb).retrieve_series(source.StudyInstanceUID, srs[0]["uid"])
    assert stored.SOPInstanceUID == outcome.sr_uid
    parsed = hd.sr.ComprehensiveSR.from_dataset(stored, copy=True)
    assert parsed.VerificationFlag == "UNVERIFIED" and parsed.CompletionFlag == "COMPLETE"
    assert stored.PatientID == source.PatientID and stored.AccessionNumber == source.AccessionNumber
    evidence = stored.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    groups = read_sr(stored)
    assert {g["finding"] for g in groups} == {"17621005", "233604007"}  # SNOMED CT: normal, pneumonia
    by_finding = {g["meaning"].lower(): g for g in groups}
    for label, p in decrypted.probabilities.items():
        group = by_finding[label]
        assert group["sop_instance_uid"] == source.SOPInstanceUID  # the right source instance
        assert group["probability"] == p  # exactly the decrypted probability (FloatingPointValue)
        assert group["present"] == (label in decrypted.present)
        assert group["algorithm"] == "medhe pneumoniamnist" and group["version"] == "1"
        assert any("encrypted" in text for text in group["parameters"])

    # the FHIR bundle validates and carries the same numbers, the study and the SR
    path = out / f"{ref}.fhir.json"
    assert outcome.fhir_path == path and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    bundle = Bundle.model_validate_json(path.read_text())
    report = bundle.entry[0].resource
    assert report.get_resource_type() == "DiagnosticReport" and report.status == "preliminary"
    assert report.identifier[0].value == f"urn:oid:{outcome.sr_uid}"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{source.StudyInstanceUID}"
    assert report.subject.identifier.value == source.PatientID
    observations = {e.resource.code.coding[0].code: e.resource for e in bundle.entry[1:]}
    for code, label in (("17621005", "normal"), ("233604007", "pneumonia")):
        assert float(observations[code].valueQuantity.value) == decrypted.probabilities[label]
    assert {ref_.reference for ref_ in report.result} == {e.fullUrl for e in bundle.entry[1:]}

    # an independent encrypted diagnosis (fresh keys) of the same file agrees: the SR holds this image's result
    local = tmp_path / "source.dcm"
    source.save_as(local, enforce_file_format=True)
    with Client(server.url) as other:
        check = other.diagnose(local)
        other.forget_keys()
    for label, p in check.probabilities.items():
        assert abs(p - decrypted.probabilities[label]) < 1e-3


def test_cli_diagnose_find_and_bad_input(orthanc, server, data_dir, tmp_path, capsys):
    """Through the command line: a query by accession, find, and one clear line per bad study, nothing written."""
    from medhe.pacs.privacy import study_ref

    dicomweb, _ = orthanc
    out = tmp_path / "fhir"
    good = make_study(_xray(data_dir, "NORMAL", 0), 2)
    ct = make_study(_xray(data_dir, "NORMAL", 1), 3, modality="CT")
    multi = make_study(_xray(data_dir, "NORMAL", 2), 4, frames=2)
    j2k = make_study(_xray(data_dir, "PNEUMONIA", 1), 5, syntax="1.2.840.10008.1.2.4.90")
    for ds in (good, ct, multi, j2k):
        upload(dicomweb, ds)
    printed = []

    rc, stdout, stderr = run_cli(capsys, "pacs", "diagnose", "--pacs", dicomweb, "--server", server.url,
                                 "--out", str(out), "--accession", good.AccessionNumber)
    printed.append(stdout + stderr)
    assert rc == 0, stderr
    assert stdout.startswith(f"study {study_ref(good.StudyInstanceUID)}: ") and "SR stored" in stdout
    assert (out / f"{study_ref(good.StudyInstanceUID)}.fhir.json").is_file()

    rc, stdout, stderr = run_cli(capsys, "pacs", "find", "--pacs", dicomweb, "--accession", good.AccessionNumber,
                                 "--json")
    (row,) = json.loads(stdout)["studies"]
    assert row["ref"] == study_ref(good.StudyInstanceUID) and row["reported"] is True
    assert row["study_instance_uid"] == good.StudyInstanceUID  # find answers the operator who asked (stdout)

    cases = [(ct, "no chest X-ray series (modalities CT)"), (multi, "is multi-frame (2 frames)"),
             (j2k, "is stored as JPEG 2000")]
    for ds, expected in cases:
        rc, stdout, stderr = run_cli(capsys, "pacs", "diagnose", "--pacs", dicomweb, "--server", server.url,
                                     "--out", str(out), "--study", ds.StudyInstanceUID)
        printed.append(stdout + stderr)
        assert rc == 2 and stdout == ""
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: study {study_ref(ds.StudyInstanceUID)}: ")
        assert expected in lines[0] and "nothing was sent or written" in lines[0], lines[0]
        assert not [s for s in series_of(dicomweb, ds.StudyInstanceUID) if s["modality"] == "SR"]
        assert not (out / f"{study_ref(ds.StudyInstanceUID)}.fhir.json").exists()

    closed = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    for argv in (["find", "--pacs", closed],
                 ["diagnose", "--pacs", closed, "--server", server.url, "--out", str(out), "--date", TODAY]):
        rc, stdout, stderr = run_cli(capsys, "pacs", *argv)
        printed.append(stdout + stderr)
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: cannot reach the PACS at {closed}")
    assert sorted(p.name for p in out.iterdir()) == [f"{study_ref(good.StudyInstanceUID)}.fhir.json"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for text in printed:
        assert "Traceback" not in text
        assert_no_phi(text)


def test_watch_picks_up_a_new_study_once(orthanc, server, reported, data_dir, tmp_path):
    """A real ``medhe pacs watch`` process: a study uploaded after it started is reported once; studies reported
    before (by other processes) are skipped, the unreadable one is named once, and it keeps polling."""
    from medhe.pacs.privacy import study_ref

    dicomweb, _ = orthanc
    out = tmp_path / "fhir"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "medhe", "pacs", "watch", "--pacs", dicomweb, "--server", server.url,
           "--out", str(out), "--interval", "1", "--max-polls", "6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stderr.readline()
        assert first.startswith(f"watching {dicomweb} for chest X-ray studies since {TODAY}"), first
        new = make_study(_xray(data_dir, "PNEUMONIA", 2), 6)
        upload(dicomweb, new)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    lines = stdout.strip().splitlines()
    ref = study_ref(new.StudyInstanceUID)
    mine = [line for line in lines if line.startswith(f"study {ref}: ")]
    assert len(mine) == 1 and "SR stored" in mine[0], lines
    assert len([s for s in series_of(dicomweb, new.StudyInstanceUID) if s["modality"] == "SR"]) == 1
    assert (out / f"{ref}.fhir.json").is_file()
    assert len(lines) == len(set(lines))  # one line per study, never two
    skipped = f"study {study_ref(reported[0].StudyInstanceUID)}: skipped (already reported"
    assert [line for line in lines if line.startswith(skipped)], lines  # reported before, by another process
    assert "6 polls" in stderr and "1 reported" in stderr
    assert "Traceback" not in stdout + stderr
    assert_no_phi(stdout + stderr)


def test_watch_backs_off_while_the_pacs_is_down(server, tmp_path, capsys):
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    rc, stdout, stderr = run_cli(capsys, "pacs", "watch", "--pacs", closed, "--server", server.url,
                                 "--out", str(tmp_path), "--interval", "0.1", "--max-backoff", "0.4",
                                 "--max-polls", "4")
    assert rc == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith(f"PACS unavailable: cannot reach the PACS at {closed}")
                                   for line in lines)
    # exponential backoff, capped at --max-backoff
    assert [line.rsplit("retrying in ", 1)[1] for line in lines] == ["0.1 s", "0.2 s", "0.4 s", "0.4 s"]
    assert "0 reported" in stderr and not list(tmp_path.iterdir())


def test_watch_retries_while_the_medhe_server_is_down(orthanc, data_dir, tmp_path):
    """A diagnosable study while the medhe server is unreachable: retried with backoff, never marked done, nothing
    written (runs last: it leaves an unreported study in the PACS)."""
    from medhe.pacs.dicomweb import Pacs
    from medhe.pacs.privacy import study_ref
    from medhe.pacs.workflow import watch
    from medhe.service.client import Client

    dicomweb, _ = orthanc
    study = make_study(_xray(data_dir, "NORMAL", 3), 7)
    upload(dicomweb, study)
    lines: list[str] = []
    with Client(f"http://127.0.0.1:{free_port()}") as down:
        counts = watch(Pacs(dicomweb), down, tmp_path, TODAY, interval=0.1, max_polls=3, max_backoff=0.2,
                       emit=lines.append)
    ref = study_ref(study.StudyInstanceUID)
    retries = [line for line in lines if line.startswith(f"study {ref}: will retry")]
    assert len(retries) == 3 and "cannot reach the medhe server" in retries[0], lines
    assert counts["reported"] == 0 and not list(tmp_path.iterdir())
    assert not [s for s in series_of(dicomweb, study.StudyInstanceUID) if s["modality"] == "SR"]
    assert_no_phi("\n".join(lines))


def test_pacs_with_authentication(tmp_path, capsys, monkeypatch):
    """An Orthanc that requires HTTP basic authentication: without credentials one line naming the fix; with
    --pacs-user and $MEDHE_PACS_PASSWORD the search works; a user without the password variable is told so."""
    with running_orthanc(tmp_path, AuthenticationEnabled=True, RegisteredUsers={"medhe": "pacs-s3cret"}) as urls:
        dicomweb, _ = urls
        monkeypatch.delenv("MEDHE_PACS_PASSWORD", raising=False)
        monkeypatch.delenv("MEDHE_PACS_TOKEN", raising=False)
        rc, stdout, stderr = run_cli(capsys, "pacs", "find", "--pacs", dicomweb)
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "refused a study search (QIDO-RS) (401)" in lines[0], stderr
        assert "--pacs-user" in lines[0]
        rc, stdout, stderr = run_cli(capsys, "pacs", "find", "--pacs", dicomweb, "--pacs-user", "medhe")
        assert rc == 2 and "set MEDHE_PACS_PASSWORD" in stderr and len(stderr.strip().splitlines()) == 1
        monkeypatch.setenv("MEDHE_PACS_PASSWORD", "wrong")
        rc, stdout, stderr = run_cli(capsys, "pacs", "find", "--pacs", dicomweb, "--pacs-user", "medhe")
        assert rc == 2 and "(401)" in stderr
        monkeypatch.setenv("MEDHE_PACS_PASSWORD", "pacs-s3cret")
        rc, stdout, stderr = run_cli(capsys, "pacs", "find", "--pacs", dicomweb, "--pacs-user", "medhe", "--json")
        assert rc == 0, stderr
        assert json.loads(stdout)["studies"] == []
        assert "pacs-s3cret" not in stdout + stderr


def test_fhir_url_posts_the_report_once_and_a_refusal_stores_nothing(orthanc, server, data_dir, tmp_path, capsys):
    """``--fhir-url``: the bundle written to --out is POSTed as a transaction to a real FHIR server on 127.0.0.1
    before the SR is stored; sending it again files nothing new (conditional creates); a FHIR server that refuses
    it or is down gives one line, no SR in the PACS and no file (runs after the watch tests: it leaves unreported
    studies in the PACS)."""
    from fhir_server import running_fhir_server

    from medhe.pacs.fhirclient import FhirServer
    from medhe.pacs.privacy import study_ref

    dicomweb, _ = orthanc
    out = tmp_path / "fhir"
    good, refused, down = (make_study(_xray(data_dir, label, i), n)
                           for label, i, n in (("PNEUMONIA", 4, 8), ("NORMAL", 5, 9), ("NORMAL", 6, 10)))
    for ds in (good, refused, down):
        upload(dicomweb, ds)
    printed = []
    with running_fhir_server() as (fhir_url, store):
        rc, stdout, stderr = run_cli(capsys, "pacs", "diagnose", "--pacs", dicomweb, "--server", server.url,
                                     "--out", str(out), "--study", good.StudyInstanceUID, "--fhir-url", fhir_url)
        printed.append(stdout + stderr)
        assert rc == 0, stderr
        assert "SR stored in the PACS" in stdout and "(sent to the FHIR server)" in stdout
        path = out / f"{study_ref(good.StudyInstanceUID)}.fhir.json"
        on_disk = json.loads(path.read_text())
        (sent,) = store.bundles
        assert sent == on_disk  # the same validated bundle, as a transaction
        (report,) = store.of_type("DiagnosticReport")
        observations = store.of_type("Observation")
        assert len(observations) == 2 and len(report["result"]) == 2
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{good.StudyInstanceUID}"
        probabilities = {o["code"]["coding"][0]["code"]: o["valueQuantity"]["value"] for o in observations}
        assert probabilities == {e["resource"]["code"]["coding"][0]["code"]: e["resource"]["valueQuantity"]["value"]
                                 for e in on_disk["entry"][1:]}
        assert [s["modality"] for s in series_of(dicomweb, good.StudyInstanceUID)].count("SR") == 1

        # a retry (the PACS refused the SR after the FHIR server took the bundle) files nothing new
        with FhirServer(fhir_url) as again:
            assert again.send(on_disk) == ["200 OK"] * 3
        assert len(store.of_type("DiagnosticReport")) == 1 and len(store.of_type("Observation")) == 2

        store.refuse = True  # answers 422 with an OperationOutcome quoting the patient id
        rc, stdout, stderr = run_cli(capsys, "pacs", "diagnose", "--pacs", dicomweb, "--server", server.url,
                                     "--out", str(out), "--study", refused.StudyInstanceUID, "--fhir-url", fhir_url)
        printed.append(stdout + stderr)
        lines = stderr.strip().splitlines()
        assert rc == 2 and stdout == "" and len(lines) == 1, stderr
        assert lines[0].startswith(f"error: study {study_ref(refused.StudyInstanceUID)}: the FHIR server at "
                                   f"{fhir_url} refused the report (HTTP 422, issue not-found")
        assert lines[0].endswith("nothing was stored in the PACS"), lines[0]
        assert len(store.resources) == 3

    closed = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    rc, stdout, stderr = run_cli(capsys, "pacs", "diagnose", "--pacs", dicomweb, "--server", server.url,
                                 "--out", str(out), "--study", down.StudyInstanceUID, "--fhir-url", closed)
    printed.append(stdout + stderr)
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and f"cannot reach the FHIR server at {closed}" in lines[0], stderr
    for ds in (refused, down):
        assert "SR" not in [s["modality"] for s in series_of(dicomweb, ds.StudyInstanceUID)]
        assert not (out / f"{study_ref(ds.StudyInstanceUID)}.fhir.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    rc, stdout, stderr = run_cli(capsys, "pacs", "diagnose", "--pacs", dicomweb, "--server", server.url,
                                 "--out", str(out), "--study", down.StudyInstanceUID, "--fhir-url", "ftp://x")
    printed.append(stdout + stderr)
    assert rc == 2 and "is not an http(s) URL" in stderr
    for text in printed:
        assert "Traceback" not in text
        assert_no_phi(text)
