"""A Markdown report over one or more evaluation JSONs: a summary table, then per run its figures and parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from medhe import atomic
from medhe.textformat import human_bytes, ms
from medhe.errors import DataError
from medhe.reporting import plots
from medhe.reporting.clinical import clinical_lines

FIGURES = (("roc", "ROC curves, plain vs encrypted", plots.roc),
           ("scatter", "Encrypted vs plaintext logits", plots.scatter),
           ("latency", "Per-image latency", plots.latency),
           ("bytes", "Bytes on the wire", plots.sizes))


def load_run(path: Path) -> dict[str, Any]:
    """An evaluation JSON with per-image logits, or a one-line ``DataError`` saying what is wrong."""
    if path.is_dir():
        raise DataError(f"{path} is a folder: pass the JSON file written by medhe evaluate --json")
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: pass the JSON file written by medhe evaluate --json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not JSON ({exc}): pass the file written by medhe evaluate --json") from None
    if not isinstance(report, dict) or "plain" not in report or "scheme" not in report:
        raise DataError(f"{path} is not a medhe evaluate report: write one with medhe evaluate --json FILE")
    if report["scheme"] != "plain" and "logits" not in report:
        raise DataError(f"{path} has no per-image logits (written by an older medhe): run medhe evaluate again")
    return report


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _slug(report: dict[str, Any], used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "-", f"{report.get('model')}-{report['scheme']}").strip("-").lower() or "run"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def _summary(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| model | scheme | n | plain ACC / AUC / F1 | encrypted ACC / AUC / F1 | agreement | max logit err "
             "| eval median (ms) | key generation (ms) | input ct |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r["plain"]
        enc = r.get("encrypted") if r.get("encrypted") is not None else r.get("simulated")
        tag = "" if r.get("encrypted") is not None or enc is None else " (simulated)"
        n_enc = r.get("n_encrypted")
        if enc is not None and n_enc and n_enc < r["n"]:
            tag += f" (first {n_enc})"
        lat = r.get("latency_ms") or {}
        keygen = lat.get("keygen") if isinstance(lat.get("keygen"), dict) else None
        ev = lat.get("eval") if isinstance(lat.get("eval"), dict) else None
        lines.append(
            f"| {r.get('model')} | {r['scheme']} | {r['n']} | {_f(p.get('acc'))} / {_f(p.get('auc'))} / "
            f"{_f(p.get('f1'))} | "
            + (f"{_f(enc.get('acc'))} / {_f(enc.get('auc'))} / {_f(enc.get('f1'))}{tag}" if enc else "-")
            + f" | {_f(r.get('agreement'), 4)} | "
            + (f"{r['max_abs_logit_error']:.2e}" if r.get("max_abs_logit_error") is not None else "-")
            + f" | {ms(ev['median']) if ev else '-'} | {ms(keygen['median']) if keygen else '-'} | "
            f"{human_bytes((r.get('bytes') or {}).get('input_ciphertext'))} |")
    return lines


def _section(report: dict[str, Any], slug: str, out: Path) -> list[str]:
    lines = [f"## {report.get('model')} — {report['scheme']}", "",
             f"{report.get('dataset')} ({report.get('split')}, n={report['n']}, task {report.get('task')})."]
    if report["scheme"] == "plain":  # no encryption: the clinician's view and, with per-image logits, the ROC
        lines += clinical_lines(report)
        png = plots.roc(report, out / f"{slug}-roc.png") if isinstance(report.get("logits"), dict) else None
        if png is None:
            return lines + ["", "Plaintext run only: nothing to plot."]
        return lines + ["", "### ROC curve, plain", "", f"![ROC curve, plain]({png.name})"]
    if report.get("reference") == "quantized":
        lines.append("The encrypted side computes the quantized integer program; agreement and logit error are "
                     "measured against it (the scatter's x axis), ROC curves against the float model.")
    if report.get("encrypted") is None:
        lines.append("Concrete's simulation (`--fhe simulate`): no ciphertexts, so no bytes and no key generation.")
    lines += clinical_lines(report)
    for key, title, draw in FIGURES:
        png = draw(report, out / f"{slug}-{key}.png")
        if png is not None:
            lines += ["", f"### {title}", "", f"![{title}]({png.name})"]
        elif key == "roc":
            lines += ["", f"### {title}", "", "No ROC curve: the encrypted images hold a single class. Evaluate "
                      "more images (a larger --limit, or the whole split)."]
    params = report.get("params") or {}
    flat = {k: v for k, v in params.items() if not isinstance(v, (list, dict))}
    lines += ["", "### Parameters", "", "| parameter | value |", "|---|---|",
              *(f"| {k} | {v} |" for k, v in flat.items())]
    machine = report.get("machine") or {}
    if machine:
        lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + "."]
    return lines


def write_report(paths: Sequence[str | Path], out: str | Path,
                 runs: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write ``out/report.md`` and its PNGs for the evaluation JSONs at ``paths`` (or the ``runs`` given)."""
    out = Path(out)
    runs = list(runs) if runs is not None else [load_run(Path(p)) for p in paths]
    if not runs:
        raise DataError("no reports given: pass one or more JSON files written by medhe evaluate --json")
    lines = ["# medhe evaluation report", "", *_summary(runs)]
    used: set[str] = set()
    for report in runs:
        lines += ["", *_section(report, _slug(report, used), out)]
    return atomic.write_text(out / "report.md", "\n".join(lines) + "\n")
