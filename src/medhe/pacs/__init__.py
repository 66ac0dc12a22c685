"""medhe in the hospital's systems: chest X-rays from a PACS over DICOMweb, results back as DICOM SR and FHIR.

Layer: between ``service`` (whose SDK ``Client`` encrypts, sends and decrypts) and ``ui``/``cli``, so the
clinician's page may use it later. Modules, one idea each:

- ``dicomweb``: QIDO-RS search, WADO-RS fetch and STOW-RS store against a DICOMweb base URL (e.g. Orthanc's);
- ``instances``: which studies and instances medhe can diagnose (chest X-ray, single frame, readable pixels);
- ``codes``: the SNOMED CT / LOINC / UCUM codes of the findings, and medhe's documented local codes;
- ``sr``: the DICOM Comprehensive SR (TID 1500) written back into the PACS;
- ``fhir``: the FHIR R4 DiagnosticReport + Observations bundle;
- ``workflow``: one study end to end, and the watch loop;
- ``privacy``: the pseudonymous study reference that logs show instead of patient or study identifiers.
"""
