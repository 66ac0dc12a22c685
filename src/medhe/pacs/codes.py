"""Codes for what medhe pacs reports: findings (SNOMED CT), the report (LOINC, DICOM), units (UCUM).

A code is used only where a standard one for exactly that concept exists; everything medhe-specific (the
probability of a finding as an AI output, "inference on encrypted data") uses medhe's local code system, documented
in docs/hospital.md: DICOM coding scheme designator ``99MEDHE`` (private designators start with 99, PS3.16 8.2) and
FHIR system ``urn:medhe:codes``. A label without a standard code keeps a local code named after the label, so
no finding is ever reported under a wrong standard code.
"""

from __future__ import annotations

from dataclasses import dataclass

SNOMED = "SCT"  # DICOM's designator for SNOMED CT
SNOMED_URL = "http://snomed.info/sct"
LOINC = "LN"
LOINC_URL = "http://loinc.org"
UCUM_URL = "http://unitsofmeasure.org"
LOCAL = "99MEDHE"
LOCAL_URL = "urn:medhe:codes"
DCM_URL = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass(frozen=True)
class Concept:
    """One coded concept; ``scheme`` is the DICOM designator (SCT, LN, DCM, 99MEDHE)."""

    value: str
    scheme: str
    meaning: str

    @property
    def fhir_system(self) -> str:
        return {SNOMED: SNOMED_URL, LOINC: LOINC_URL, LOCAL: LOCAL_URL}.get(self.scheme, DCM_URL)

    def fhir(self) -> dict:
        return {"system": self.fhir_system, "code": self.value, "display": self.meaning}


# Findings of the shipped chest X-ray models, by label as lower case without separators.
_FINDINGS = {
    "normal": Concept("17621005", SNOMED, "Normal"),
    "pneumonia": Concept("233604007", SNOMED, "Pneumonia"),
    "covid": Concept("840539006", SNOMED, "Disease caused by severe acute respiratory syndrome coronavirus 2"),
    "atelectasis": Concept("46621007", SNOMED, "Atelectasis"),
    "cardiomegaly": Concept("8186001", SNOMED, "Cardiomegaly"),
    "effusion": Concept("60046008", SNOMED, "Pleural effusion"),
    "pneumothorax": Concept("36118008", SNOMED, "Pneumothorax"),
    "edema": Concept("19242006", SNOMED, "Pulmonary edema"),
    "emphysema": Concept("87433001", SNOMED, "Pulmonary emphysema"),
    "consolidation": Concept("95436008", SNOMED, "Lung consolidation"),
    "fibrosis": Concept("51615001", SNOMED, "Fibrosis of lung"),
    "hernia": Concept("84089009", SNOMED, "Hiatal hernia"),  # ChestX-ray14's "Hernia" is hiatal hernia
}

#: labels of chest X-ray models medhe pacs accepts without a standard code (reported under local codes)
_LOCAL_FINDINGS = {"infiltration", "mass", "nodule", "pleuralthickening"}

# The report and its parts.
CHEST_XRAY = Concept("399208008", SNOMED, "Plain chest X-ray")  # the procedure reported
IMAGING_STUDY_REPORT = Concept("18748-4", LOINC, "Diagnostic imaging study")  # FHIR DiagnosticReport.code
PROBABILITY = Concept("probability", LOCAL, "Probability of finding (AI model output)")
ENCRYPTED_INFERENCE = Concept("encrypted-inference", LOCAL, "AI inference on homomorphically encrypted data")
PRESENT = Concept("present", LOCAL, "Finding above the model's decision threshold")
ABSENT = Concept("absent", LOCAL, "Finding below the model's decision threshold")
UNIT_ONE = Concept("1", "UCUM", "no units")


def _key(label: str) -> str:
    return "".join(ch for ch in label.lower() if ch.isalnum())


def finding(label: str) -> Concept:
    """The concept of a model label: SNOMED CT where one exists, else a local code named after the label."""
    key = _key(label)
    if key in _FINDINGS:
        return _FINDINGS[key]
    return Concept(f"finding-{key}", LOCAL, label.replace("_", " "))


def is_chest_xray_label(label: str) -> bool:
    """Whether ``label`` is a finding of a chest X-ray model medhe pacs knows (the model guard uses it)."""
    return _key(label) in _FINDINGS or _key(label) in _LOCAL_FINDINGS
