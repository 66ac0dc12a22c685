"""The four figures of a report, each from one evaluation JSON: ROC, logit scatter, latency, bytes.

Drawn with matplotlib's Agg backend (files only, no display). Each function returns the PNG path it wrote, or
``None`` when the report holds nothing to draw (a TFHE simulation moves no bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medhe import atomic
from medhe.models.metrics import predictions, probabilities

_STAGE_COLOURS = {"encrypt": "tab:blue", "eval": "tab:orange", "decrypt": "tab:green"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic.write_bytes(path, buf.getvalue())


def _encrypted_label(report: dict[str, Any]) -> str:
    return "simulated" if report.get("encrypted") is None else "encrypted"


def _positive(report: dict[str, Any], names: list[str]) -> int:
    """The finding's class of a two-class report: its clinical block's, else ``positive_class`` on the names."""
    from medhe.models.clinical import positive_class

    for block in (report.get("clinical") or {}).values():
        if isinstance(block, dict) and "positive" in block:
            return int(block["positive"]["index"])
    return positive_class(names)[0] if len(names) == 2 else 1


def _curves(task: str, labels: np.ndarray, logits: np.ndarray, names: list[str],
            positive: int = 1) -> list[tuple[str, Any, Any, Any]]:
    """(name, y_true, score, decided) per ROC curve: the positive class (the finding) for two classes, one-vs-rest
    or per label else; ``decided`` is the model's own decision, whose (FPR, TPR) is the operating point."""
    prob = probabilities(task, logits)
    pred = predictions(task, logits)
    if task == "multi-label":
        cols = [(names[k], labels[:, k], prob[:, k], pred[:, k]) for k in range(prob.shape[1])]
    elif prob.shape[1] == 2:
        cols = [(names[positive], labels[:, 0] == positive, prob[:, positive], pred == positive)]
    else:
        cols = [(names[k], labels[:, 0] == k, prob[:, k], pred == k) for k in range(prob.shape[1])]
    return [(n, np.asarray(y, dtype=int), s, np.asarray(d, dtype=bool)) for n, y, s, d in cols
            if 0 < np.sum(y) < len(y)]


def _operating_point(y: np.ndarray, decided: np.ndarray) -> tuple[float, float]:
    """(FPR, TPR) of the model's decision threshold."""
    return float(decided[y == 0].mean()), float(decided[y == 1].mean())


def roc(report: dict[str, Any], path: Path) -> Path | None:
    """ROC curves, plain (solid) vs encrypted (dashed), on the images that ran encrypted (a plain run: plain
    alone, all images); a dot (plain) and a cross (encrypted) mark the decision threshold's operating point."""
    from sklearn.metrics import auc, roc_curve

    lg = report["logits"]
    has_enc = bool(lg.get("encrypted"))
    m = len(lg["encrypted"]) if has_enc else len(lg["plain"])
    labels = np.asarray(lg["labels"]).reshape(len(lg["labels"]), -1)[:m]
    names = [str(n) for n in report.get("labels") or range(np.asarray(lg["plain"]).shape[1])]
    positive = _positive(report, names) if report.get("task") != "multi-label" else 1
    enc_name = _encrypted_label(report)
    plain = _curves(report["task"], labels, np.asarray(lg["plain"])[:m], names, positive)
    enc = _curves(report["task"], labels, np.asarray(lg["encrypted"]), names, positive) if has_enc else []
    if not plain:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    colours = plt.get_cmap("tab10" if len(plain) <= 10 else "tab20")
    for k, curve in enumerate(plain):
        c = colours(k % colours.N)
        name = curve[0]
        # plain wide and pale underneath, encrypted thin and dashed on top: identical curves stay both visible
        sides = [(curve, "-", 4.0, 0.35, "plain", "o")]
        if has_enc:
            sides.append((enc[k], "--", 1.4, 1.0, enc_name, "x"))
        for (_, y, scores, decided), style, width, alpha, which, marker in sides:
            fpr, tpr, _ = roc_curve(y, scores)
            label = f"{name}, {which} (AUC {auc(fpr, tpr):.3f})" if len(plain) <= 4 else None
            ax.plot(fpr, tpr, style, color=c, lw=width, alpha=alpha, label=label)
            op_fpr, op_tpr = _operating_point(y, decided)
            ax.plot([op_fpr], [op_tpr], marker, color=c, ms=8 if marker == "o" else 9, mew=2,
                    label=f"{name}, {which}: decision threshold (FPR {op_fpr:.2f}, TPR {op_tpr:.2f})"
                    if len(plain) <= 2 else None)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.01), title=f"ROC, {report['model']} ({report['scheme']}, {m} images)")
    if len(plain) <= 4:
        ax.legend(loc="lower right", fontsize=7)
    if len(plain) > 2:
        ax.text(0.98, 0.02 if len(plain) > 4 else 0.98, f"{len(plain)} curves; wide pale: plain"
                + (f", dashed: {enc_name}" if has_enc else "") + "; o / x: decision threshold",
                ha="right", va="bottom" if len(plain) > 4 else "top", fontsize=8, transform=ax.transAxes)
    return _save(fig, path)


def scatter(report: dict[str, Any], path: Path) -> Path | None:
    """Encrypted logits against the plaintext computation they implement (the diagonal is exact agreement)."""
    lg = report["logits"]
    enc = np.asarray(lg["encrypted"], dtype=float)
    ref_key = "reference" if "reference" in lg else "plain"
    ref = np.asarray(lg[ref_key], dtype=float)[: len(enc)]
    ref_name = "quantized program" if ref_key == "reference" else "plain float model"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(ref.ravel(), enc.ravel(), s=9, alpha=0.6, color="tab:blue", edgecolors="none")
    lo, hi = float(min(ref.min(), enc.min())), float(max(ref.max(), enc.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "-", color="grey", lw=0.8)
    err = report.get("max_abs_logit_error")  # from the unrounded logits
    err = float(np.max(np.abs(enc - ref))) if err is None else float(err)
    ax.set(xlabel=f"logit, {ref_name}", ylabel=f"logit, {_encrypted_label(report)}",
           title=f"{report['model']} ({report['scheme']}): max |error| {err:.2e}")
    ax.set_aspect("equal", adjustable="box")
    return _save(fig, path)


def latency(report: dict[str, Any], path: Path) -> Path | None:
    """Per-image latency histograms, one panel per stage (their scales differ by orders of magnitude)."""
    samples = {k: v for k, v in (report.get("samples_ms") or {}).items() if v}
    if not samples:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(3.6 * len(samples), 3.2), squeeze=False)
    keygen = (report.get("latency_ms") or {}).get("keygen")
    for ax, (stage, values) in zip(axes[0], samples.items()):
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color=_STAGE_COLOURS.get(stage, "tab:grey"))
        med = float(np.median(values))
        ax.axvline(med, color="black", lw=1, ls="--")
        ax.set(xlabel="ms", ylabel="images", title=f"{stage}: median {med:.3g} ms")
    title = f"{report['model']} ({report['scheme']}), {len(next(iter(samples.values())))} images"
    if isinstance(keygen, dict):
        title += f"; key generation {keygen['median']:.0f} ms once"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def sizes(report: dict[str, Any], path: Path) -> Path | None:
    """Bytes on the wire (log scale: keys are often 100x a ciphertext)."""
    items = [(k.replace("_", " "), v) for k, v in (report.get("bytes") or {}).items() if isinstance(v, (int, float))]
    if not items:
        return None
    from medhe.textformat import human_bytes

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.6 * len(items)))
    names, values = zip(*items)
    bars = ax.barh(names, values, color="tab:purple")
    ax.set_xscale("log")
    ax.bar_label(bars, labels=[human_bytes(v) for v in values], padding=3, fontsize=8)
    ax.set_xlim(left=max(1.0, min(values) / 10), right=max(values) * 20)  # every bar visibly long
    ax.set(xlabel="bytes (log scale)", title=f"{report['model']} ({report['scheme']}): bytes on the wire")
    ax.invert_yaxis()
    return _save(fig, path)
