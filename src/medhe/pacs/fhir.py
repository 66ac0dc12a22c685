"""The FHIR result: an R4 DiagnosticReport with one Observation per (image, finding), as a transaction Bundle.

Validated by fhir.resources (its R4B models: FHIR 4.3, the same DiagnosticReport and Observation as R4), so a
bundle medhe writes always parses. References use identifiers, not server ids, because medhe does not know the
ids of the hospital's FHIR server: the patient by its DICOM Patient ID, the study by ``urn:oid:<Study Instance
UID>`` (FHIR's ImagingStudy.identifier convention), the DICOM SR by its SOP Instance UID. The bundle is a
``transaction``, so it can be POSTed as is to a FHIR server's base URL. Status ``preliminary``: AI output that a
radiologist has not verified, like the SR's UNVERIFIED flag.

Every resource also carries a stable identifier (a name-based UUID of the study, the source image, the finding,
the model and its version; also its ``fullUrl``) and is a conditional create on it (``ifNoneExist``), so sending the
same study's result twice (a retry after the PACS refused the SR) files it once (``medhe.pacs.fhirclient``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from medhe.pacs import codes
from medhe.pacs.sr import ImageResult, statement

DICOM_UID_SYSTEM = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"  # FHIR's system for identifiers that are URIs (here urn:uuid:...)
#: namespace of medhe's name-based (version 5) UUIDs for FHIR resources
RESOURCE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medhe:fhir-resource")
OBSERVATION_CATEGORY = {"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging", "display": "Imaging"}
REPORT_CATEGORY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
THORAX = {"system": "http://snomed.info/sct", "code": "51185008", "display": "Thoracic structure"}


def stable_urn(*parts: str) -> str:
    """``urn:uuid:`` of a version-5 UUID of ``parts``: the same study, image, finding and model give the same one."""
    return f"urn:uuid:{uuid.uuid5(RESOURCE_NAMESPACE, '|'.join(parts))}"


def _conditional(urn: str, resource_type: str) -> dict[str, str]:
    return {"method": "POST", "url": resource_type, "ifNoneExist": f"identifier={URI_SYSTEM}|{urn}"}


def _when(ds) -> str | None:
    """The study's DICOM date (+ time when its UTC offset is recorded) as a FHIR dateTime: FHIR needs a time
    zone with a time, and DICOM times carry none unless TimezoneOffsetFromUTC says so."""
    date = str(ds.get("StudyDate", "") or "").strip()
    if len(date) != 8 or not date.isdigit():
        return None
    out = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    time = str(ds.get("StudyTime", "") or "").strip().split(".")[0]
    offset = str(ds.get("TimezoneOffsetFromUTC", "") or "").strip()
    if len(time) >= 4 and time.isdigit() and len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        seconds = time[4:6] if len(time) >= 6 else "00"
        out += f"T{time[:2]}:{time[2:4]}:{seconds}{offset[:3]}:{offset[3:]}"
    return out


def build_bundle(results: list[ImageResult], sr_uid: str, model: str, version: str, scheme: str,
                 conclusion: str) -> dict[str, Any]:
    """The transaction bundle (a dict, validated) for one study's results."""
    first = results[0].source
    subject = {"type": "Patient", "identifier": {"value": str(first.get("PatientID", "") or "unknown")}}
    issuer = str(first.get("IssuerOfPatientID", "") or "")
    if issuer:
        subject["identifier"]["assigner"] = {"display": issuer}
    study = {"type": "ImagingStudy",
             "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{first.StudyInstanceUID}"}}
    effective = _when(first)
    device = {"display": f"medhe {model} v{version}"}
    method = {"coding": [codes.ENCRYPTED_INFERENCE.fhir()], "text": statement(scheme)}
    entries, refs = [], []
    for r in results:
        for label, p in r.probabilities.items():
            concept = codes.finding(label)
            full = stable_urn("observation", str(first.StudyInstanceUID), str(r.source.SOPInstanceUID), label,
                              model, version)
            obs = {"resourceType": "Observation", "status": "preliminary",
                   "identifier": [{"system": URI_SYSTEM, "value": full}],
                   "category": [{"coding": [OBSERVATION_CATEGORY]}],
                   "code": {"coding": [concept.fhir()], "text": f"Probability of {concept.meaning} (medhe {model})"},
                   "subject": subject, "valueQuantity": {"value": float(p), "unit": "probability",
                                                         "system": codes.UCUM_URL, "code": "1"},
                   "interpretation": [{"coding": [{"system": INTERPRETATION,
                                                   "code": "POS" if label in r.present else "NEG",
                                                   "display": "Positive" if label in r.present else "Negative"}]}],
                   "method": method, "device": device, "derivedFrom": [study],
                   "bodySite": {"coding": [THORAX]},
                   "note": [{"text": f"source image urn:oid:{r.source.SOPInstanceUID}"}]}
            if effective:
                obs["effectiveDateTime"] = effective
            entries.append({"fullUrl": full, "resource": obs, "request": _conditional(full, "Observation")})
            refs.append({"reference": full})
    report_urn = stable_urn("report", str(first.StudyInstanceUID), model, version)
    report = {"resourceType": "DiagnosticReport", "status": "preliminary", "category": [{"coding": [REPORT_CATEGORY]}],
              "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{sr_uid}"},
                             {"system": URI_SYSTEM, "value": report_urn}],
              "code": {"coding": [codes.IMAGING_STUDY_REPORT.fhir()], "text": "AI chest X-ray diagnosis (encrypted)"},
              "subject": subject, "issued": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "imagingStudy": [study], "result": refs, "conclusion": f"{conclusion}. {statement(scheme)}"}
    if effective:
        report["effectiveDateTime"] = effective
    entries.insert(0, {"fullUrl": report_urn, "resource": report,
                       "request": _conditional(report_urn, "DiagnosticReport")})
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return validate(bundle)


def validate(bundle: dict[str, Any]) -> dict[str, Any]:
    """The bundle after a round trip through fhir.resources (raises on anything FHIR R4 would reject)."""
    import json

    from fhir.resources.R4B.bundle import Bundle

    return json.loads(Bundle.model_validate(bundle).model_dump_json(exclude_none=True))
