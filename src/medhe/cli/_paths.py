"""Where the CLI may write: a user's typo must not silently create folders at odd places (even at /)."""

from __future__ import annotations

from pathlib import Path

from medhe.errors import MedheError


def output_file(path: str, option: str) -> Path:
    """``path`` for a file to write; its folder must exist already (a one-line error names it otherwise)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MedheError(f"{option} {path} is a folder: give a file name, e.g. {p / 'report.json'}")
    if not p.parent.is_dir():
        raise MedheError(f"{option} {path}: folder {p.parent} does not exist; create it first or pick another path")
    return p


def output_dir(path: str, option: str) -> Path:
    """``path`` as a folder to write into: created if missing, but only inside a folder that exists."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise MedheError(f"{option} {path} is a file, not a folder: pick a folder name")
    if not p.exists():
        if not p.parent.is_dir():
            raise MedheError(f"{option} {path}: folder {p.parent} does not exist; create it first or pick "
                             "another path")
        p.mkdir()
    return p


def input_dir(path: str | None, option: str) -> str | None:
    """A data folder: an existing one, or a new one (a download fills it) directly inside an existing folder.

    ``None`` passes through (the default applies)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise MedheError(f"{option} {path} is a file, not a folder: pass the folder holding the dataset files")
    if not p.exists() and not p.parent.is_dir():
        raise MedheError(f"{option} {path}: neither it nor its parent folder {p.parent} exists; check the path")
    return str(p)
