"""Which instances medhe pacs diagnoses, checked before anything is encrypted, sent or written.

A chest X-ray study here: a CR or DX series whose body part (when recorded) is the chest; each instance a single
frame whose pixel data medhe decodes losslessly with pydicom's own decoders (uncompressed, deflated or RLE), so a
result does not depend on which optional codecs a machine happens to have. Compressed instances are asked from the
PACS as Explicit VR Little Endian (DICOMweb transcoding, e.g. Orthanc's); only when the PACS cannot do that is an
instance refused. Pixels go through ``medhe.data.read_image``, the same path as ``medhe predict scan.dcm``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from medhe.errors import DataError
from medhe.pacs.dicomweb import CXR_MODALITIES

#: transfer syntaxes whose pixel data pydicom decodes itself, losslessly
READABLE_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
#: a chest X-ray study has one to a few views; more is not a study medhe pacs should diagnose image by image
MAX_IMAGES = 8
_NOTHING = "nothing was sent or written"


class NotDiagnosable(DataError):
    """A study or instance medhe pacs does not diagnose (wrong modality, multi-frame, unreadable pixels)."""


def chest_series(ref: str, series: list[dict[str, str]]) -> list[dict[str, str]]:
    """The CR/DX series of a study; a study without one is refused with the modalities it has."""
    found = [s for s in series if s["modality"] in CXR_MODALITIES]
    if not found:
        mods = sorted({s["modality"] or "unknown" for s in series}) or ["none"]
        raise NotDiagnosable(f"study {ref}: no chest X-ray series (modalities {', '.join(mods)}); medhe pacs "
                             f"diagnoses CR/DX chest radiographs only, {_NOTHING}")
    return found


def check_instance(ref: str, index: int, ds) -> None:
    """Refuse (one line) an instance that is not a single-frame chest radiograph medhe can decode."""
    where = f"study {ref}: image {index}"
    modality = str(ds.get("Modality", ""))
    if modality not in CXR_MODALITIES:
        raise NotDiagnosable(f"{where} has modality {modality or 'unknown'}, not CR/DX; medhe pacs diagnoses "
                             f"chest radiographs only, {_NOTHING}")
    body = str(ds.get("BodyPartExamined", "") or "").upper()
    if body and body != "CHEST":
        raise NotDiagnosable(f"{where} shows body part {body}, not CHEST; medhe's models read chest X-rays only, "
                             f"{_NOTHING}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise NotDiagnosable(f"{where} is multi-frame ({frames} frames); medhe pacs diagnoses single-frame "
                             f"radiographs, {_NOTHING}")
    if "PixelData" not in ds:
        raise NotDiagnosable(f"{where} has no pixel data (not an image instance), {_NOTHING}")
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax not in READABLE_SYNTAXES:
        name = getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "name", "") or "unknown"
        raise NotDiagnosable(f"{where} is stored as {name} ({syntax or 'no transfer syntax'}), which the PACS "
                             "could not send uncompressed and medhe does not decode; have the PACS transcode it "
                             f"(Orthanc: its GDCM plugin decodes JPEG 2000) or store it uncompressed, {_NOTHING}")


def pixels(ref: str, index: int, ds) -> np.ndarray:
    """The uint8 image medhe's models read, decoded exactly as ``medhe predict`` decodes a DICOM file."""
    from medhe.data import read_image

    with tempfile.TemporaryDirectory(prefix="medhe-pacs-") as tmp:  # 0700, removed at once: it holds PHI
        path = Path(tmp) / "instance.dcm"
        ds.save_as(path, enforce_file_format=True)
        try:
            return read_image(path)
        except DataError as exc:
            raise NotDiagnosable(f"study {ref}: image {index}: {str(exc).replace(str(path), 'the instance')}, "
                                 f"{_NOTHING}") from None
