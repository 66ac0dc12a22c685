"""What medhe pacs may print: a pseudonymous study reference instead of any identifier from the PACS.

Logs of a hospital service end up in places patient data must not go (ticket systems, log aggregators), so every
line medhe pacs writes names a study by ``ref`` - the first 10 hex digits of the SHA-256 of its Study Instance UID -
never by patient name or id, accession number, dates of birth or the UID itself. The hospital can map a ref back
(``medhe pacs find`` prints both, on stdout, for the operator who asked) and the result files are named by it.
"""

from __future__ import annotations

import hashlib


def study_ref(study_uid: str) -> str:
    """The pseudonym of a study: stable across runs, so one study's lines and files can be matched up."""
    return hashlib.sha256(str(study_uid).encode()).hexdigest()[:10]
