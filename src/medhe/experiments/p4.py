"""Replication of P4's method (Boulila et al. 2022): train a CNN on Paillier-"encrypted" chest X-rays.

P4 encrypts every pixel with Paillier, stores the ciphertexts back as an 8-bit image and trains an ordinary
classifier on those images. Nothing is computed on ciphertexts, and a ciphertext is a number mod n^2 (6144 bits
for a 3072-bit key), so the 8-bit re-save keeps only a residue of it. What that residue says about the pixel
depends entirely on the randomness r in c = (1 + m n) r^n mod n^2:

* ``fresh``  — a new r per pixel, which is what Paillier requires and what phe does. The residue is (statistically)
  uniform and independent of the pixel: the images are noise and nothing can be learned from them.
* ``image``  — one r per image. Equal pixels give equal bytes within an image, so shapes survive, but the grey
  level -> byte table changes from image to image.
* ``global`` — one r for the whole dataset: a fixed substitution of the 256 grey levels. A CNN can learn through
  a fixed substitution, but this is a deterministic encoding, not semantically secure encryption.

The experiment measures test accuracy of the same classifier (medhe's MobileNetV2-style network, trained with the
same recipe and selected on validation) on plain images and on each variant, plus the mutual information between
plain pixel and stored byte, and writes a JSON and a Markdown report. The 8-bit reduction is ``c mod 256`` (the
low byte); P4 does not specify theirs, and any fixed byte of a fresh ciphertext behaves the same.
Images are resized to ``size`` before encryption (one Paillier encryption per pixel is the cost driver).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import phe
import torch
from phe import paillier

from medhe import atomic
from medhe.data import Preprocess, load_dataset, resolve_data_dir
from medhe.data.images import resize
from medhe.errors import DataError, SecurityError
from medhe.models.metrics import compute_metrics
from medhe.models.train_extractor import predict_logits, train_split_model

from medhe.experiments.p4_modes import MODES  # noqa: E402  (re-exported)
DATASET = "covid19_radiography_subset"
PUBLISHED = {"plain_acc": 0.942, "encrypted_acc": 0.933, "model": "MobileNetV2 (ImageNet-size)",
             "source": "Boulila et al., SMARTTECH 2022, arXiv 2203.07728"}
#: Smallest modulus the experiment accepts. The experiment studies what an 8-bit residue of a ciphertext reveals,
#: which does not depend on the key size once n^2 is far above 2^8; small keys only make it affordable
#: (hundreds of thousands of encryptions). The inference path enforces >= 2048 bits; this never protects data.
MIN_EXPERIMENT_KEY_BITS = 128


def encrypt_images(images: np.ndarray, public_key: paillier.PaillierPublicKey, mode: str,
                   global_r: int | None = None, progress: bool = False) -> np.ndarray:
    """P4's transform: Paillier-encrypt each pixel (phe ``raw_encrypt``) and keep ``c mod 256`` as uint8."""
    if mode not in MODES:
        raise DataError(f"unknown P4 mode {mode!r}: use one of {', '.join(MODES)}")
    out = np.empty_like(images, dtype=np.uint8)
    if mode == "global":
        r = global_r if global_r is not None else public_key.get_random_lt_n()
        table = np.array([public_key.raw_encrypt(v, r_value=r) % 256 for v in range(256)], dtype=np.uint8)
        return table[images]
    from tqdm import tqdm

    for i, img in enumerate(tqdm(images, desc=f"Paillier-encrypting pixels ({mode})", unit="img", leave=False,
                                 disable=not progress)):
        if mode == "image":
            r = public_key.get_random_lt_n()
            values = np.unique(img)
            table = np.zeros(256, dtype=np.uint8)
            table[values] = [public_key.raw_encrypt(int(v), r_value=r) % 256 for v in values]
            out[i] = table[img]
        else:  # fresh randomness for every pixel
            enc = public_key.raw_encrypt
            out[i] = np.fromiter((enc(int(v)) % 256 for v in img.ravel()), dtype=np.uint8,
                                 count=img.size).reshape(img.shape)
    return out


def mutual_information(plain: np.ndarray, stored: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Plug-in I(pixel; byte) in bits, and the same estimate after shuffling (the estimator's bias floor)."""
    x = plain.ravel().astype(np.int64)
    y = stored.ravel().astype(np.int64)

    def mi(a: np.ndarray, b: np.ndarray) -> float:
        joint = np.bincount(a * 256 + b, minlength=65536).reshape(256, 256).astype(np.float64)
        joint /= joint.sum()
        pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        return float((joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum())

    shuffled = np.random.default_rng(seed).permutation(y)
    p = np.bincount(x, minlength=256) / len(x)
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return {"bits": round(mi(x, y), 4), "shuffled_bits": round(mi(x, shuffled), 4),
            "pixel_entropy_bits": round(entropy, 4)}


def _train_and_test(x: dict[str, np.ndarray], y: dict[str, np.ndarray], pre: Preprocess, epochs: int,
                    extractor_kwargs: dict[str, Any], seed: int, log: Callable[[str], None] | None) -> dict[str, Any]:
    t = {s: pre.batch(v) for s, v in x.items()}
    res = train_split_model(t["train"], y["train"], t["val"], y["val"], extractor_kwargs=extractor_kwargs,
                            epochs=epochs, seed=seed, log=log)
    out: dict[str, Any] = {"best_epoch": res.best_epoch, "train_seconds": round(res.seconds, 1)}
    for split in ("val", "test"):
        m = compute_metrics("binary-class", y[split].reshape(-1, 1), predict_logits(res.extractor, res.head, t[split]))
        out[split] = {k: (None if v is None else round(float(v), 4)) for k, v in m.items()}
    return out


def _explain(report: dict[str, Any]) -> str:
    plain = report["plain"]["test"]["acc"]
    chance = report["majority_class_rate"]
    lines = [f"Plain images: test ACC {plain:.3f} (P4 reports {PUBLISHED['plain_acc']:.3f} with a full-size "
             f"MobileNetV2 on the full database; this run uses {report['n_images']['train']} training images at "
             f"{report['size']} px)."]
    for mode, r in report["modes"].items():
        acc, mi = r["test"]["acc"], r["mutual_information"]
        verdict = ("at chance level" if abs(acc - chance) <= 0.1 else "well above chance")
        lines.append(f"{mode}: test ACC {acc:.3f} ({verdict}; majority class {chance:.3f}); the stored byte carries "
                     f"{mi['bits']:.3f} bits about the pixel (shuffled baseline {mi['shuffled_bits']:.3f}, pixel "
                     f"entropy {mi['pixel_entropy_bits']:.2f}).")
    learned = [m for m, r in report["modes"].items() if abs(r["test"]["acc"] - chance) > 0.1]
    fresh = ("With fresh randomness — how Paillier must be used, and what phe does — the 8-bit residue of a "
             "ciphertext is independent of the pixel, so no classifier can do better than chance on it. ")
    if learned:
        fresh += (f"A classifier learned only in {', '.join(learned)}, where the randomness is reused: there the "
                  "'encryption' is a deterministic substitution of grey levels, which keeps the image's structure "
                  "(equal pixels give equal bytes) and is not semantically secure. ")
    else:
        fresh += "No variant measured here gave the classifier a usable signal. "
    lines.append(fresh + "In no variant is anything computed on ciphertexts: whoever trains and predicts works on the "
                 "stored bytes in the clear. medhe's sound alternative: `medhe evaluate --model covid-cxr --scheme "
                 "paillier` (public feature extractor on the client, private linear head evaluated on Paillier "
                 "ciphertexts).")
    return "\n\n".join(lines)


def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _markdown(report: dict[str, Any]) -> str:
    rows = [f"| plain | {_f(report['plain']['test']['acc'])} | {_f(report['plain']['test']['auc'])} | - | - |"]
    for mode, r in report["modes"].items():
        rows.append(f"| {mode} | {_f(r['test']['acc'])} | {_f(r['test']['auc'])} | "
                    f"{_f(r['mutual_information']['bits'])} | {_f(r['encrypt_seconds'], 1)} |")
    return "\n".join([
        "# P4 replication: training on Paillier-encrypted, 8-bit re-saved chest X-rays", "",
        f"Command: `{report['command']}`", "",
        f"Dataset `{report['dataset']}` (" + ", ".join(f"{k} {v}" for k, v in report["n_images"].items()) +
        f" images; medhe's stratified split), {report['size']} px grayscale, Paillier key "
        f"{report['key_bits']} bits (phe {report['phe_version']}), reduction `{report['reduction']}`, "
        f"{report['epochs']} epochs, model selected on validation.", "",
        "| images | test ACC | test AUC | I(pixel; byte) bits | encryption s |",
        "|---|---|---|---|---|", *rows, "",
        f"Published (P4): plain {PUBLISHED['plain_acc']}, encrypted {PUBLISHED['encrypted_acc']}.", "",
        "## Explanation", "", report["explanation"], ""])


def run_p4_experiment(data_dir: str | Path | None = None, *, size: int = 64, key_bits: int = 256,
                      modes: tuple[str, ...] = MODES, epochs: int = 15, width_mult: float = 0.5,
                      feature_dim: int = 32, seed: int = 0, limit: int | None = None,
                      out_dir: str | Path | None = "reports/p4", command: str = "medhe experiment p4",
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the replication and return the report; ``limit`` keeps the first N images per split (smoke runs)."""
    if key_bits < MIN_EXPERIMENT_KEY_BITS:
        raise SecurityError(f"--key-bits {key_bits} is below {MIN_EXPERIMENT_KEY_BITS}: phe needs a real modulus")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise DataError(f"unknown P4 mode(s) {bad}: choose from {', '.join(MODES)}")
    if size < 32:
        raise DataError(f"--size {size} is too small for the MobileNetV2-style network (use >= 32)")
    torch.set_num_threads(1)
    say = log or (lambda _m: None)
    folder = resolve_data_dir(data_dir) / DATASET
    # native size first (decoded once per process and shared with every other user of the folder), then shrink
    splits = {s: load_dataset(folder, split=s, channels=1) for s in ("train", "val", "test")}
    for ds in splits.values():
        if limit is not None:  # evenly spaced rows: splits are sorted by path, so both classes stay represented
            keep = np.unique(np.linspace(0, len(ds) - 1, min(limit, len(ds))).astype(int))
            ds.images, ds.labels = ds.images[keep], ds.labels[keep]
        ds.images = np.stack([resize(img, size) for img in ds.images])
    x = {s: d.images for s, d in splits.items()}
    y = {s: d.labels.reshape(-1) for s, d in splits.items()}
    pre = Preprocess(channels=1, size=size, crop=None, mean=0.5, std=0.5)
    kwargs = {"in_channels": 1, "image_size": size, "width_mult": width_mult, "feature_dim": feature_dim}
    test_counts = np.bincount(y["test"], minlength=2)
    report: dict[str, Any] = {
        "experiment": "p4", "command": command, "dataset": DATASET,
        "n_images": {s: int(len(v)) for s, v in x.items()}, "size": size, "key_bits": key_bits,
        "phe_version": phe.__version__, "reduction": "c mod 256",
        "epochs": epochs, "seed": seed, "classifier": {"arch": "mobilenetv2-he + linear-head", **kwargs},
        "majority_class_rate": round(float(test_counts.max() / test_counts.sum()), 4), "published": PUBLISHED,
    }
    say("training on plain images")
    report["plain"] = _train_and_test(x, y, pre, epochs, kwargs, seed, log)
    public_key, _secret = paillier.generate_paillier_keypair(n_length=key_bits)
    global_r = public_key.get_random_lt_n()
    report["modes"] = {}
    for mode in modes:
        say(f"encrypting {sum(len(v) for v in x.values())} images pixel by pixel ({mode} randomness)")
        t0 = time.perf_counter()
        enc = {s: encrypt_images(v, public_key, mode, global_r, progress=log is not None) for s, v in x.items()}
        seconds = time.perf_counter() - t0
        result = _train_and_test(enc, y, pre, epochs, kwargs, seed, log)
        result.update(encrypt_seconds=round(seconds, 1),
                      mutual_information=mutual_information(x["train"], enc["train"], seed))
        report["modes"][mode] = result
        if out_dir is not None:
            _save_examples(Path(out_dir), mode, x["test"][:4], enc["test"][:4])
    report["explanation"] = _explain(report)
    if out_dir is not None:
        report["written"] = write_report(report, Path(out_dir))
    return report


def write_report(report: dict[str, Any], out: Path) -> list[str]:
    """(Re)write p4_report.json and p4_report.md from a report's measurements (the explanation is regenerated)."""
    report = {k: v for k, v in report.items() if k != "written"}
    report["explanation"] = _explain(report)
    atomic.write_json(out / "p4_report.json", report)
    atomic.write_text(out / "p4_report.md", _markdown(report))
    return [str(out / "p4_report.json"), str(out / "p4_report.md")]


def _save_examples(out: Path, mode: str, plain: np.ndarray, enc: np.ndarray) -> None:
    """A strip of plain | encrypted image pairs, for the eye (PNG, written atomically)."""
    import io

    from PIL import Image

    strip = np.concatenate([np.concatenate([p, e], axis=0) for p, e in zip(plain, enc)], axis=1)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    atomic.write_bytes(out / f"p4_examples_{mode}.png", buf.getvalue())
