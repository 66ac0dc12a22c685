"""``medhe pacs``: chest X-rays from the hospital's PACS (DICOMweb) diagnosed under encryption, results back as
a DICOM SR into the PACS and a FHIR DiagnosticReport bundle on disk (docs/hospital.md)."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from datetime import date

from medhe.service import protocol

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pacs", help="diagnose chest X-rays from a PACS (DICOMweb) and write DICOM SR + FHIR back",
                       description="Find chest X-ray studies in a PACS over DICOMweb (QIDO-RS), fetch them "
                                   "(WADO-RS), diagnose them on a medhe server under encryption (the key stays "
                                   "here), store the result as a DICOM Structured Report (STOW-RS) and write a "
                                   "FHIR R4 DiagnosticReport bundle. Log lines name studies by a pseudonymous ref, "
                                   "never by patient or study identifiers.")
    cmds = p.add_subparsers(dest="pacs_command", metavar="SUBCOMMAND")

    def common(q: argparse.ArgumentParser, server: bool) -> None:
        q.add_argument("--pacs", required=True, metavar="URL",
                       help="DICOMweb root of the PACS, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)")
        q.add_argument("--pacs-timeout", type=float, default=60.0, metavar="S", help="per request (default 60)")
        q.add_argument("--pacs-user", metavar="USER",
                       help="HTTP basic authentication at the PACS; the password comes from $MEDHE_PACS_PASSWORD "
                            "(a bearer token instead: $MEDHE_PACS_TOKEN)")
        q.add_argument("--pacs-cacert", metavar="FILE", help="CA bundle to verify the PACS's TLS certificate")
        if server:
            q.add_argument("--server", required=True, metavar="URL", help="medhe server, e.g. http://127.0.0.1:8000")
            q.add_argument("--model", help="served model id (needed when the server offers several)")
            q.add_argument("--token", help=f"bearer token of the medhe server (default: ${protocol.TOKEN_ENV})")
            q.add_argument("--cacert", help="CA bundle to verify the medhe server's self-signed TLS certificate")
            q.add_argument("--out", default="medhe-fhir", metavar="DIR",
                           help="folder for the FHIR bundles, one REF.fhir.json per study (default medhe-fhir)")
            q.add_argument("--fhir-url", metavar="URL",
                           help="also POST each study's FHIR bundle (a transaction) to this FHIR server's base URL, "
                                "before the SR is stored; a bearer token comes from $MEDHE_FHIR_TOKEN")
            q.add_argument("--fhir-cacert", metavar="FILE", help="CA bundle to verify the FHIR server's certificate")

    def query(q: argparse.ArgumentParser) -> None:
        q.add_argument("--patient", metavar="ID", help="Patient ID")
        q.add_argument("--date", metavar="DATE", help="study date: YYYYMMDD, or a range YYYYMMDD-YYYYMMDD / "
                                                      "YYYYMMDD- / -YYYYMMDD")
        q.add_argument("--accession", metavar="NUMBER", help="accession number")

    f = cmds.add_parser("find", help="list studies (QIDO-RS) with their ref and whether medhe reported them")
    common(f, server=False)
    query(f)
    f.add_argument("--modality", metavar="M", help="a modality in the study (e.g. CR, DX); default: any")
    f.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    f.set_defaults(handler=run_find)

    d = cmds.add_parser("diagnose", help="diagnose chest X-ray studies (one --study, or those a query matches)")
    common(d, server=True)
    d.add_argument("--study", metavar="UID", help="Study Instance UID")
    query(d)
    d.set_defaults(handler=run_diagnose)

    w = cmds.add_parser("watch", help="poll the PACS and diagnose every new chest X-ray study")
    common(w, server=True)
    w.add_argument("--since", default="today", metavar="DATE",
                   help="studies dated DATE (YYYYMMDD) or later (default today); already reported ones are skipped")
    w.add_argument("--interval", type=float, default=30.0, metavar="S", help="seconds between polls (default 30)")
    w.add_argument("--max-backoff", type=float, default=300.0, metavar="S",
                   help="longest wait between retries while the PACS or the server is down (default 300)")
    w.add_argument("--max-polls", type=int, metavar="N", help="stop after N polls (default: until interrupted)")
    w.set_defaults(handler=run_watch)
    p.set_defaults(handler=lambda args: _help(p))


def _help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 1


def _pacs(args: argparse.Namespace):
    return open_pacs(args.pacs, args.pacs_user, args.pacs_cacert, timeout=args.pacs_timeout)


def open_pacs(url: str, user: str | None, cacert: str | None, timeout: float = 60.0, command: str = "medhe pacs"):
    """The PACS at ``url`` with the credentials of $MEDHE_PACS_PASSWORD (with ``user``) or $MEDHE_PACS_TOKEN; the
    pacs extra's packages named in one line when missing (``medhe pacs`` and ``medhe ui --pacs``)."""
    import importlib

    from medhe.errors import MedheError

    missing = []
    for name, module in (("dicomweb-client", "dicomweb_client"), ("highdicom", "highdicom"),
                         ("fhir.resources", "fhir.resources.R4B")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    if missing:
        raise MedheError(f"{command} needs {', '.join(missing)}: pip install 'medhe[pacs]' (from a clone: "
                         "pip install -e '.[pacs]')")
    import os

    from medhe.pacs.dicomweb import PASSWORD_ENV, TOKEN_ENV, Pacs

    return Pacs(url, timeout=timeout, user=user, password=os.environ.get(PASSWORD_ENV) if user else None,
                token=None if user else os.environ.get(TOKEN_ENV) or None, verify=cacert or True)


def _fhir(args: argparse.Namespace):
    """The FHIR server of --fhir-url, or None (the bundles then only go to --out)."""
    if not args.fhir_url:
        return None
    import os

    from medhe.pacs.fhirclient import TOKEN_ENV, FhirServer

    return FhirServer(args.fhir_url, token=os.environ.get(TOKEN_ENV) or None, timeout=args.pacs_timeout,
                      verify=args.fhir_cacert or True)


def _client(args: argparse.Namespace):
    from medhe.service.client import Client

    return Client(args.server, token=args.token, verify=args.cacert or True)


def run_find(args: argparse.Namespace) -> int:
    from medhe.pacs.privacy import study_ref
    from medhe.pacs.workflow import already_reported

    from medhe.pacs.dicomweb import check_date

    check_date(args.date, "--date")
    pacs = _pacs(args)
    studies = pacs.search_studies(patient=args.patient, modality=args.modality, date=args.date,
                                  accession=args.accession)
    rows = [{"ref": study_ref(st.uid), "study_instance_uid": st.uid, "date": st.date,
             "modalities": st.modalities, "instances": st.instances,
             "reported": already_reported(pacs.series(st.uid))} for st in studies]
    if args.json:
        print(json.dumps({"pacs": pacs.url, "studies": rows}, indent=2))
        return 0
    for r in rows:
        print(f"{r['ref']}  {r['study_instance_uid']}  {r['date'] or '-'}  {'/'.join(r['modalities']) or '-'}  "
              f"{r['instances'] if r['instances'] is not None else '?'} images  "
              f"{'reported' if r['reported'] else 'not reported'}")
    print(f"{len(rows)} studies", file=sys.stderr)
    return 0


def run_diagnose(args: argparse.Namespace) -> int:
    from medhe.errors import MedheError
    from medhe.pacs.privacy import study_ref
    from medhe.pacs.workflow import diagnose_study

    from medhe.pacs.dicomweb import check_date

    check_date(args.date, "--date")
    if not (args.study or args.patient or args.date or args.accession):
        raise MedheError("say which studies: --study UID, or a query (--patient, --date, --accession)")
    pacs = _pacs(args)
    if args.study:
        uids = [args.study]
    else:
        uids = [st.uid for st in pacs.search_cxr_studies(patient=args.patient, date=args.date,
                                                         accession=args.accession)]
        if not uids:
            raise MedheError("no chest X-ray (CR/DX) study in the PACS matches that query; list studies with "
                             "medhe pacs find")
    failed = 0
    fhir = _fhir(args)
    with _client(args) as client:
        try:
            for uid in uids:
                try:
                    outcome = diagnose_study(pacs, client, uid, args.out, args.model, fhir=fhir)
                except MedheError as exc:
                    if len(uids) == 1:
                        raise
                    failed += 1
                    print(f"error: {exc}" if str(exc).startswith("study ") else
                          f"error: study {study_ref(uid)}: {exc}", file=sys.stderr)
                    continue
                print(outcome.line, flush=True)
        finally:
            if fhir is not None:
                fhir.close()
            client.forget_keys()
    return 2 if failed else 0


def run_watch(args: argparse.Namespace) -> int:
    from medhe.errors import MedheError
    from medhe.pacs.workflow import check_model, watch

    since = date.today().strftime("%Y%m%d") if args.since == "today" else args.since
    if not re.fullmatch(r"\d{8}", since or ""):
        raise MedheError(f"--since {args.since!r} is not a date: use YYYYMMDD (or today)")
    if args.interval <= 0 or args.max_backoff < args.interval:
        raise MedheError("--interval must be > 0 and --max-backoff at least --interval")
    pacs = _pacs(args)
    fhir = _fhir(args)

    def stop(signum, frame):  # SIGTERM (a service manager stopping us) ends like Ctrl-C: keys forgotten
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with _client(args) as client:
        check_model(client.model_info(args.model))  # before the first poll: a wrong model is one line, at once
        print(f"watching {pacs.url} for chest X-ray studies since {since} (every {args.interval:g} s)",
              file=sys.stderr, flush=True)
        try:
            counts = watch(pacs, client, args.out, since, args.model, interval=args.interval,
                           max_polls=args.max_polls, max_backoff=args.max_backoff,
                           emit=lambda line: print(line, flush=True), fhir=fhir)
        finally:
            if fhir is not None:
                fhir.close()
            try:
                client.forget_keys()
            except MedheError:
                pass  # the server is gone: its keys expire on their own
    print(f"{counts['reported']} reported, {counts['skipped']} skipped, {counts['refused']} not diagnosable, "
          f"{counts['polls']} polls", file=sys.stderr)
    return 0
