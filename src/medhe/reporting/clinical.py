"""The clinician's tables of a report: binary threshold/sensitivity/specificity/confusion, or P1's multi-label set.

Read from the report's ``clinical`` block; a report written before the block existed gets it computed from its own
per-image labels and logits (``medhe.he.report.clinical_block``), so old JSONs render the same tables.
"""

from __future__ import annotations

from typing import Any

from medhe.he.report import clinical_block

_RULES = {"card": "named by the model card", "normal-label": "the label not named normal",
          "index-1": "class index 1, MedMNIST's convention", "given": "given by the caller"}


def clinical_sets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{logit set: block}`` of ``report`` (its own block, else one computed from its logits; empty: neither)."""
    block = report.get("clinical")
    if not isinstance(block, dict):
        block = clinical_block(report) or {}
    return {k: v for k, v in block.items() if isinstance(v, dict)}


def _v(entry: dict[str, Any] | None) -> str:
    return "-" if not entry or entry.get("value") is None else f"{entry['value']:.3f}"


def _ci(entry: dict[str, Any] | None, resamples: int) -> str:
    if not entry or not entry.get("ci95"):
        return "-"
    lo, hi = entry["ci95"]
    used = entry.get("resamples", resamples)
    return f"{lo:.3f} – {hi:.3f}" + (f" ({used} of {resamples} resamples)" if used < resamples else "")


def _table(sets: dict[str, dict[str, Any]], rows: list[tuple[str, Any]]) -> list[str]:
    """One row per metric, a value and an interval column per logit set; ``rows``: (name, block -> entry)."""
    head = "| metric | " + " | ".join(f"{k} (n={m['n']}) | 95 % CI" for k, m in sets.items()) + " |"
    lines = [head, "|---|" + "---|---|" * len(sets)]
    for name, get in rows:
        cells = []
        for m in sets.values():
            entry = get(m)
            cells += [_v(entry), _ci(entry, m["bootstrap"]["resamples"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _boot_note(first: dict[str, Any]) -> str:
    b = first["bootstrap"]
    return (f"95 % intervals: percentile bootstrap over images ({b['resamples']} resamples with replacement, seed "
            f"{b['seed']}); \"-\" where a metric is undefined on these images.")


def binary_lines(sets: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(sets.values()))
    pos, neg = first["positive"], first["negative"]
    lines = ["", "### Clinician's view", "",
             f"Positive class (the finding): **{pos['label']}** ({_RULES.get(pos.get('rule'), pos.get('rule'))}); "
             f"negative: {neg['label']}. Decision threshold: {first['threshold']['rule']}. " + _boot_note(first), ""]
    lines += _table(sets, [(f"threshold on {first['threshold']['score']}",
                            lambda m: {"value": m["threshold"]["probability"]}),
                           ("sensitivity (recall of the positive class)", lambda m: m["sensitivity"]),
                           ("specificity", lambda m: m["specificity"]), ("PPV (precision)", lambda m: m["ppv"]),
                           ("NPV", lambda m: m["npv"]), ("ACC", lambda m: m["acc"]), ("AUC", lambda m: m["auc"])])
    for key, m in sets.items():
        c = m["confusion"]
        lines += ["", f"Confusion matrix, {key} (n={m['n']}; rows: truth, columns: the model's decision):", "",
                  f"| | decided {c['positive']} | decided {c['negative']} |", "|---|---|---|",
                  f"| {c['positive']} | {c['tp']} (TP) | {c['fn']} (FN) |",
                  f"| {c['negative']} | {c['fp']} (FP) | {c['tn']} (TN) |"]
    return lines


def multilabel_lines(sets: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(sets.values()))
    rows: list[tuple[str, Any]] = [("subset accuracy (all labels right)", lambda m: m["subset_accuracy"])]
    for metric in ("auc", "f1"):
        rows += [(f"{metric.upper()} {avg}", lambda m, metric=metric, avg=avg: m[metric][avg])
                 for avg in ("micro", "macro", "weighted")]
    for j, lab in enumerate(first["per_label"]):
        for metric in ("auc", "f1"):
            rows.append((f"{metric.upper()} {lab['label']} ({lab['positives']} positive)",
                         lambda m, j=j, metric=metric: m["per_label"][j][metric]))
    return ["", "### Multi-label metrics (P1's set)", "",
            f"Decision: {first['threshold']['rule']}. Per-label positives are counted on the plain set's images. "
            "AUC averages skip labels with one class only (per resample too). " + _boot_note(first), "",
            *_table(sets, rows)]


def clinical_lines(report: dict[str, Any]) -> list[str]:
    """The Markdown of the clinician's view of ``report`` (empty for tasks it does not cover)."""
    sets = clinical_sets(report)
    if not sets:
        if not isinstance(report.get("logits"), dict):
            return ["", "No clinician's view: this JSON has no per-image logits (written by an older medhe); run "
                        "medhe evaluate again."]
        return []
    kind = next(iter(sets.values()))["kind"]
    return binary_lines(sets) if kind == "binary" else multilabel_lines(sets)
