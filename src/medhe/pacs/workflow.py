"""One study end to end, and the watch loop that runs it on every new chest X-ray study.

Order matters for "nothing half-written": every instance is fetched and checked before any key, ciphertext or
result leaves this process; the SR and the FHIR bundle are built and validated in memory; the FHIR file is written
(atomically) next, then sent to the hospital's FHIR server when one is named (a refusal stops there), then the SR
is stored in one STOW-RS request, and if that fails the FHIR file is removed again.
So a study ends either fully reported (SR in the PACS and its bundle on disk) or not at all. The SR in the PACS is
also the idempotency record: a study whose series include medhe's SR is skipped, whichever process reported it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medhe.errors import MedheError
from medhe.pacs import instances as inst
from medhe.pacs.codes import is_chest_xray_label
from medhe.pacs.dicomweb import Pacs, PacsCannotTranscode, PacsUnavailable
from medhe.pacs.fhirclient import FhirError, FhirServer
from medhe.pacs.privacy import study_ref
from medhe.pacs.sr import MANUFACTURER, SERIES_DESCRIPTION, ImageResult, build_sr


@dataclass
class StudyOutcome:
    """What happened to one study: ``status`` "reported" or "skipped"; ``line`` is the PHI-free log line."""

    ref: str
    status: str
    line: str
    sr_uid: str | None = None
    fhir_path: Path | None = None
    results: list[ImageResult] = field(default_factory=list)


def already_reported(series: list[dict[str, str]]) -> bool:
    """Whether medhe's SR is among a study's series (any model: one AI report per study)."""
    return any(s["modality"] == "SR" and s["description"] == SERIES_DESCRIPTION
               and s["manufacturer"] in ("", MANUFACTURER) for s in series)


def check_model(info: dict[str, Any]) -> None:
    """Refuse a served model that is not one of medhe's chest X-ray models (its labels name no CXR finding)."""
    bad = [label for label in info["labels"] if not is_chest_xray_label(label)]
    if bad:
        raise MedheError(f"model {info['id']!r} is not a chest X-ray model medhe pacs reports (labels "
                         f"{', '.join(map(repr, bad))} are no chest findings); serve one such as pneumoniamnist, "
                         "covid-cxr or cxr14-ckks and pass it with --model")


def _fetch(pacs: Pacs, ref: str, study_uid: str, series: list[dict[str, str]]) -> list:
    """Every instance of the study's chest X-ray series, uncompressed where the PACS can transcode."""
    found = []
    for s in inst.chest_series(ref, series):
        try:
            found += pacs.fetch_series(study_uid, s["uid"])
        except PacsCannotTranscode:
            found += pacs.fetch_series(study_uid, s["uid"], transfer_syntax="*")  # checked below, refused there
    if not found:
        raise inst.NotDiagnosable(f"study {ref}: its chest X-ray series hold no instances; nothing was sent or "
                                  "written")
    if len(found) > inst.MAX_IMAGES:
        raise inst.NotDiagnosable(f"study {ref}: {len(found)} chest X-ray images, more than the {inst.MAX_IMAGES} "
                                  "medhe pacs diagnoses per study; nothing was sent or written")
    return sorted(found, key=lambda ds: (int(ds.get("SeriesNumber", 0) or 0), int(ds.get("InstanceNumber", 0) or 0)))


def study_images(pacs: Pacs, study_uid: str, series: list[dict[str, str]] | None = None) -> list[tuple[Any, Any]]:
    """(dataset, pixels) of every chest X-ray image of a study, fetched and checked before anything leaves this
    process: what ``diagnose_study`` diagnoses and what the clinician's page opens."""
    ref = study_ref(study_uid)
    series = pacs.series(study_uid) if series is None else series
    if not series:
        raise inst.NotDiagnosable(f"study {ref}: the PACS lists no series for it; nothing was sent or written")
    datasets = _fetch(pacs, ref, study_uid, series)
    for i, ds in enumerate(datasets, 1):
        inst.check_instance(ref, i, ds)
    return [(ds, inst.pixels(ref, i, ds)) for i, ds in enumerate(datasets, 1)]


def _conclusion(results: list[ImageResult], task: str) -> str:
    parts = []
    for i, r in enumerate(results, 1):
        if task == "multi-label":
            found = ", ".join(f"{name} p={r.probabilities[name]:.3f}" for name in r.present) or "no finding"
        else:
            top = r.present[0]
            found = f"{top} p={r.probabilities[top]:.3f}"
        parts.append(found if len(results) == 1 else f"image {i}: {found}")
    return "; ".join(parts)


def diagnose_study(pacs: Pacs, client, study_uid: str, out_dir: str | os.PathLike, model: str | None = None,
                   fhir: FhirServer | None = None) -> StudyOutcome:
    """Diagnose one study under encryption and write the SR (into the PACS) and the FHIR bundle (into
    ``out_dir/<ref>.fhir.json``, and to the ``fhir`` server when given, before the SR); a study medhe already
    reported is skipped."""
    from medhe import __version__
    from medhe.atomic import write_text

    ref = study_ref(study_uid)
    series = pacs.series(study_uid)
    if already_reported(series):  # (no series at all: study_images says so)
        return StudyOutcome(ref, "skipped", f"study {ref}: skipped (already reported: medhe's SR is in the PACS)")
    pairs = study_images(pacs, study_uid, series)
    datasets, images = [ds for ds, _ in pairs], [image for _, image in pairs]
    info = client.model_info(model)
    check_model(info)
    results = []
    for i, (ds, image) in enumerate(zip(datasets, images), 1):
        dx = client.diagnose(image, info["id"], source=f"study {ref} image {i}")
        present = list(dx.positive) if info["task"] == "multi-label" else [dx.label]
        results.append(ImageResult(ds, dict(dx.probabilities), present))
    version = str(info.get("version") or "unknown")
    scheme = str(info.get("scheme") or info["spec"].get("scheme", "unknown"))
    sr = build_sr(results, info["id"], version, scheme, __version__)
    conclusion = _conclusion(results, info["task"])
    from medhe.pacs.fhir import build_bundle

    bundle = build_bundle(results, str(sr.SOPInstanceUID), info["id"], version, scheme, conclusion)
    import json

    path = Path(out_dir) / f"{ref}.fhir.json"
    write_text(path, json.dumps(bundle, indent=2) + "\n")
    try:
        if fhir is not None:  # first: a FHIR server that refuses the report leaves the study unreported
            fhir.send(bundle)
        pacs.store([sr])
    except FhirError as exc:
        path.unlink(missing_ok=True)
        raise FhirError(f"study {ref}: {exc}; nothing was stored in the PACS", transient=exc.transient) from None
    except BaseException:
        path.unlink(missing_ok=True)  # the SR is not in the PACS, so neither is the study reported
        raise
    sent = " (sent to the FHIR server)" if fhir is not None else ""
    return StudyOutcome(ref, "reported", f"study {ref}: {conclusion} -> SR stored in the PACS, FHIR {path.name}{sent}",
                        sr_uid=str(sr.SOPInstanceUID), fhir_path=path, results=results)


def _transient(pacs: Pacs, client, exc: BaseException) -> bool:
    """Whether a failure is worth retrying: the PACS or the medhe server is unreachable now. A study medhe
    refused for what it is (modality, frames, pixels) stays refused whatever else is down."""
    if isinstance(exc, inst.NotDiagnosable):
        return False
    if isinstance(exc, FhirError):
        return exc.transient
    if isinstance(exc, PacsUnavailable):
        return True
    if not pacs.reachable():
        return True
    try:
        client.refresh_models()
        client.health()
    except MedheError:
        return True
    return False


def watch(pacs: Pacs, client, out_dir: str | os.PathLike, since: str, model: str | None = None,
          interval: float = 30.0, max_polls: int | None = None, max_backoff: float = 300.0,
          emit: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
          fhir: FhirServer | None = None) -> dict[str, int]:
    """Poll QIDO-RS for chest X-ray studies dated ``since`` (YYYYMMDD) or later and diagnose each new one; one
    line per study through ``emit``. Unreachable PACS or server: retry with exponential backoff (up to
    ``max_backoff`` s); a study that cannot be diagnosed is reported once and not retried. Returns counts."""
    done: set[str] = set()
    counts = {"reported": 0, "skipped": 0, "refused": 0, "polls": 0}
    delay = interval
    while max_polls is None or counts["polls"] < max_polls:
        counts["polls"] += 1
        retry = False
        try:
            studies = pacs.search_cxr_studies(since=since)
        except PacsUnavailable as exc:
            studies, retry = [], True
            emit(f"PACS unavailable: {exc}; retrying in {delay:g} s")
        for st in studies:
            if st.uid in done:
                continue
            try:
                outcome = diagnose_study(pacs, client, st.uid, out_dir, model, fhir=fhir)
            except MedheError as exc:
                if _transient(pacs, client, exc):
                    emit(f"study {study_ref(st.uid)}: will retry ({_without_ref(str(exc), study_ref(st.uid))})")
                    retry = True
                    break
                done.add(st.uid)
                counts["refused"] += 1
                emit(f"study {study_ref(st.uid)}: not diagnosed: {_without_ref(str(exc), study_ref(st.uid))}")
                continue
            done.add(st.uid)
            counts[outcome.status] += 1
            emit(outcome.line)
        if max_polls is not None and counts["polls"] >= max_polls:
            break
        if retry:  # exponential backoff while the PACS or the server is away, the normal interval after
            sleep(delay)
            delay = min(delay * 2, max_backoff)
        else:
            delay = interval
            sleep(interval)
    return counts


def _without_ref(message: str, ref: str) -> str:
    prefix = f"study {ref}: "
    return message[len(prefix):] if message.startswith(prefix) else message
