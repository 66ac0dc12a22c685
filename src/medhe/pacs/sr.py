"""The DICOM result: a Comprehensive SR (TID 1500 Measurement Report, built and validated by highdicom).

One measurement group per (image, finding): the finding's SNOMED code as finding type, its probability as a
measurement (UCUM "no units"; the exact float in FloatingPointValue, the 16-character decimal beside it), whether
it is above the model's threshold as a qualitative evaluation, the source image referenced by SOP Class/Instance
UID, and the algorithm (medhe model name and card version) whose parameters state that the inference ran on
encrypted data under which scheme. The observer is the medhe device. The SR is COMPLETE but UNVERIFIED: a
radiologist verifies AI output; medhe never marks it verified.
"""

from __future__ import annotations

from dataclasses import dataclass

from medhe.pacs import codes

#: the SR series' description, which is also how medhe recognises a study it has already reported
SERIES_DESCRIPTION = "medhe encrypted AI diagnosis"
MANUFACTURER = "medhe"


@dataclass
class ImageResult:
    """The decrypted result of one source image: probabilities per label and the labels called present."""

    source: object  # the pydicom dataset of the source instance (only its UIDs and study attributes are used)
    probabilities: dict[str, float]
    present: list[str]


def statement(scheme: str) -> str:
    """The sentence every medhe report carries about how its result was computed."""
    return (f"Inference ran on homomorphically encrypted data ({scheme.upper()}): the model input and its result "
            "were encrypted with a key that never left the hospital; the model server saw only ciphertexts.")


def _code(concept: codes.Concept):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)


#: type 2 patient/study attributes highdicom copies from the evidence; a PACS may omit them, DICOM allows empty
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _evidence(ds):
    """A header-only copy of a source instance (no pixels) with absent type 2 attributes present and empty, so
    the SR carries exactly the patient/study attributes the PACS already holds."""
    from pydicom.dataset import Dataset

    head = Dataset()
    head.update({elem.tag: elem for elem in ds if elem.keyword != "PixelData"})
    head.file_meta = getattr(ds, "file_meta", None) or Dataset()
    for keyword in _TYPE2:
        if keyword not in head:
            setattr(head, keyword, None)
    return head


def build_sr(results: list[ImageResult], model: str, version: str, scheme: str, medhe_version: str,
             series_number: int = 9001):
    """The SR dataset for one study (every result's source from that study), ready for STOW-RS."""
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm
    from pydicom.uid import generate_uid

    sources = [_evidence(r.source) for r in results]
    study_uids = {str(s.StudyInstanceUID) for s in sources}
    if len(study_uids) != 1:
        raise ValueError("one SR reports one study")
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"medhe {model}"[:64], version=str(version)[:64],
        parameters=[statement(scheme)[:1024], f"scheme: {scheme}", f"medhe {medhe_version}"])
    device = hd.sr.ObserverContext(
        observer_type=dcm.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="medhe", manufacturer_name=MANUFACTURER,
            model_name=f"{model} v{version}"[:64]))
    groups = []
    for r in results:
        source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(r.source)
        for label, p in r.probabilities.items():
            concept = _code(codes.finding(label))
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"medhe {label}"[:64]),
                finding_type=concept,
                method=_code(codes.ENCRYPTED_INFERENCE),
                algorithm_id=algorithm,
                source_images=[source_image],
                measurements=[hd.sr.Measurement(name=_code(codes.PROBABILITY), value=float(p),
                                                unit=_code(codes.UNIT_ONE), algorithm_id=algorithm)],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                    name=concept, value=_code(codes.PRESENT if label in r.present else codes.ABSENT))]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_code(codes.CHEST_XRAY), imaging_measurements=groups,
        title=dcm.DCM.ImagingMeasurementReport)
    sr = hd.sr.ComprehensiveSR(
        evidence=sources, content=report, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, series_description=SERIES_DESCRIPTION)
    sr.preamble = b"\x00" * 128
    return sr


def read_sr(ds) -> list[dict]:
    """The measurement groups of a medhe SR, read back with highdicom: per group the referenced SOP Instance UID,
    the finding code and meaning, the probability (FloatingPointValue) and present/absent."""
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(ds, copy=True)
    out = []
    for group in sr.content.get_image_measurement_groups():
        measurement = group.get_measurements()[0]
        texts: dict[str, list[str]] = {}
        for item in measurement[0].get("ContentSequence", []):  # TID 4019 Algorithm Identification
            if item.ValueType == "TEXT":
                texts.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(str(item.TextValue))
        out.append({"sop_instance_uid": group.source_images[0].referenced_sop_instance_uid,
                    "finding": group.finding_type.value, "meaning": group.finding_type.meaning,
                    "probability": float(measurement.value),
                    "present": group.get_qualitative_evaluations()[0].value.value == codes.PRESENT.value,
                    "algorithm": (texts.get("Algorithm Name") or [None])[0],
                    "version": (texts.get("Algorithm Version") or [None])[0],
                    "parameters": texts.get("Algorithm Parameters", [])})
    return out
