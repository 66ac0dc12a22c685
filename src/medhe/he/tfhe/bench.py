"""``medhe bench --scheme tfhe``: medhe's TFHE model against a plain concrete-python FCNN, in the same run.

The baseline is the one issue #5 names: 784 -> 64 -> 2 with 4-bit inputs, weights and activations, no pooling, no
accumulator-aware training and **no rounding**: each hidden accumulator goes whole into its table lookup, its width
taken from a calibration set as Concrete's conventional recipe does (13 bits here; the worst case would be 16).
Its weights are a seeded torch initialisation quantized to 4 bits (timing depends on the bit widths, not on
training). Stages are timed separately because they differ by orders of magnitude: compile (seconds), key
generation (~1 GB of keys, tens of seconds) and per-image execution (minutes on 2 cores), so a slow baseline is
reported as such instead of looking like a hang; progress lines go to stderr.

``against`` adds a row for another shipped TFHE model on the same images, one after the other in the same run
(issue 34: ``pneumoniamnist-qfcnn-lut``, one exact 5-bit lookup per hidden neuron, against ``pneumoniamnist-qfcnn``,
whose exact rounding costs 96 PBS), with the ratio of median server-eval times; ``baseline_images=0`` then skips
the minutes-long concrete-python baseline.

Optionally (``rounded_extra``) an extra row, clearly labelled, times the same network with exact rounding (medhe's
circuit form) to 6 bits before each lookup (the recipe behind reference.md's 576-PBS figure). It is not the baseline.

Both circuits go through the same client/server byte path (``TFHEClient`` / ``TFHEServerModel``) on the same
images, one after the other, so the ratio holds on a shared machine better than absolute times do; the load
average is recorded next to every stage, and CPU time (``time.process_time``, all threads) next to wall time.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np
import torch

from medhe.errors import DataError
from medhe.he.evaluate import ImageRun, run_encrypted
from medhe.he.tfhe import compile_tfhe
from medhe.he.tfhe.server import TFHEServerModel
from medhe.machine import load_average, machine_info
from medhe.stats import summarize
from medhe.models.metrics import predictions
from medhe.models.quant import build_qfcnn

#: The issue's baseline: 784 -> 64 -> 2, 4-bit inputs/weights/activations, no accumulator rounding.
BASELINE = {"hidden": 64, "quant_bits": 4, "input_bits": 4, "act_bits": 4, "acc_bits": None, "pool": 1,
            "range_penalty": 0.0}
#: Extra row only: the same network with exact rounding of each accumulator to 6 bits.
ROUNDED_EXTRA = dict(BASELINE, acc_bits=6)
BASELINE_NAME = "concrete-python FCNN 784-64-2, 4-bit inputs/weights/activations, no rounding"
ROUNDED_NAME = "EXTRA (not the baseline): the same FCNN with exact rounding of accumulators to 6 bits"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[tfhe bench {time.strftime('%H:%M:%S')} load {load_average()}] {msg}", file=sys.stderr, flush=True)


def baseline_server(calibration_images: np.ndarray, seed: int = 0, rounded: bool = False) -> TFHEServerModel:
    """The baseline circuit (``rounded=True``: the extra, exactly rounded variant), compiled for execution.

    Accumulator widths come from ``calibration_images`` (preprocessed float images), not from worst-case hints:
    the worst case of an unrounded 784-input 4-bit layer (16 bits) exceeds Concrete's table-lookup limit."""
    torch.manual_seed(seed)
    model = build_qfcnn(in_channels=1, num_outputs=2, image_size=28, **(ROUNDED_EXTRA if rounded else BASELINE))
    model.eval()
    integer = model.export_integer()
    name = "baseline-fcnn-784-64-2-4bit" + ("-rounded6" if rounded else "")
    card = {"name": name, "task": "binary-class", "labels": ["0", "1"]}
    # Concrete's default (uncompressed) keys and inputs: the plain recipe, as a concrete-python user starts
    return TFHEServerModel(integer, card, mode="execute", exactness="exact", hints=rounded,
                           calibration=integer.quantize_input(calibration_images),
                           compress_evaluation_keys=False, compress_input_ciphertexts=False)


class _Heartbeat:
    """Says every ``every`` seconds that a long stage is still running (the unrounded baseline takes minutes)."""

    def __init__(self, progress: bool, what: str, every: float = 60.0) -> None:
        self.progress, self.what, self.every = progress, what, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.every):
            _say(self.progress, f"{self.what}: still running, {time.perf_counter() - t0:.0f} s so far")

    def __enter__(self) -> "_Heartbeat":
        if self.progress:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


def _timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def _pipeline(label: str, server: TFHEServerModel, compile_s: float, images: np.ndarray,
              progress: bool) -> dict[str, Any]:
    """Key generation once, then encrypt -> server eval -> decrypt per image (``run_encrypted``, the loop every
    report uses), each stage timed (wall and CPU), with heartbeats on the slow stages."""
    p = server.params
    _say(progress, f"{label}: compiled in {compile_s:.1f} s: {p['pbs_count']} PBS, accumulators "
                   f"{p['accumulator_bits']} bits, max width {p['max_bit_width']}, evaluation keys "
                   f"{(p['bootstrap_key_bytes'] + p['keyswitch_key_bytes']) / 1e6:.1f} MB; generating keys")
    load_keygen = load_average()
    loads: list[Any] = []

    def stage(name: str) -> _Heartbeat:
        if name != "key generation":
            _say(progress, f"{label}: {name}")
            loads.append(load_average())
        return _Heartbeat(progress, f"{label}: {name}")

    def on_keys(info: dict[str, Any]) -> None:
        _say(progress, f"{label}: keys generated in {info['generate_ms'] / 1e3:.1f} s (serialized "
                       f"{info['serialize_ms'] / 1e3:.1f} s, loaded by the server "
                       f"{info['server_load_ms'] / 1e3:.1f} s)")

    def on_image(r: ImageRun) -> None:
        _say(progress, f"{label}: image {r.index + 1}/{len(images)}: server eval {r.eval_ms / 1e3:.3f} s "
                       f"(CPU {r.eval_cpu_ms / 1e3:.3f} s), encrypt {r.encrypt_ms / 1e3:.3f} s, "
                       f"decrypt {r.decrypt_ms / 1e3:.3f} s")

    run = run_encrypted(server, images, progress=False, on_image=on_image, stage=stage, on_keys=on_keys)
    keys, runs, logits = run["keys"], run["images"], run["logits"]
    raw_out = server.integer.accumulators(logits)
    sim = server.simulate(server.integer.quantize_input(images))
    eval_ms = [r.eval_ms for r in runs]
    return {
        "model": label,
        "n_images": int(len(images)),
        "compile_s": round(compile_s, 2),
        "keygen_s": round(keys["generate_ms"] / 1e3, 2),
        "keygen_cpu_s": round(keys["generate_cpu_ms"] / 1e3, 2),
        "keys_serialize_s": round(keys["serialize_ms"] / 1e3, 2),
        "keys_load_s": round(keys["server_load_ms"] / 1e3, 2),
        "load_average_at_keygen": load_keygen,
        "latency_ms": {"encrypt": run["latency_ms"]["encrypt"], "eval": run["latency_ms"]["eval"],
                       "eval_cpu": summarize([r.eval_cpu_ms for r in runs]), "decrypt": run["latency_ms"]["decrypt"]},
        "eval_ms_median": round(float(np.median(eval_ms)), 3),
        "eval_ms_each": [round(v, 1) for v in eval_ms],
        "load_average_per_image": loads,
        "bytes": run["bytes"],
        "pbs_count": p["pbs_count"],
        "accumulator_bits": p["accumulator_bits"],
        "tlu_input_bits": p.get("tlu_input_bits"),
        "max_bit_width": p["max_bit_width"],
        "evaluation_key_bytes": p["bootstrap_key_bytes"] + p["keyswitch_key_bytes"],
        "p_error": p["p_error"],
        "security_bits": p["security_bits"],
        "params": p,
        "executed_equals_simulated_bits": int(np.sum(np.all(raw_out == sim, axis=1))),
        "_logits": logits,
        "_sim": sim,
    }


def _against_row(name: str, images: np.ndarray, labels: np.ndarray, progress: bool) -> dict[str, Any]:
    """The ``against`` model through the same pipeline on the same preprocessed images."""
    from medhe.models.artifact import load_artifact

    artifact = load_artifact(name)
    _say(progress, f"compiling {artifact.name} (the row to compare against)")
    server, compile_ms, _ = _timed(compile_tfhe, artifact, "execute")
    row = _pipeline(artifact.name, server, compile_ms / 1e3, images, progress)
    logits, sim = row.pop("_logits"), row.pop("_sim")
    row.update({
        "executed_equals_simulated": int(np.sum(predictions(artifact.task, logits)
                                                == predictions(artifact.task, server.integer.dequantize(sim)))),
        "accuracy_on_these_images": float(np.mean(predictions(artifact.task, logits) == labels[:, 0])),
    })
    return {"against": row}


def run_tfhe_benchmark(model: str = "pneumoniamnist-qfcnn", n_images: int = 10, data_dir: Any = None,
                       baseline_images: int = 1, seed: int = 0, rounded_extra: bool = False,
                       progress: bool = True, against: str | None = None) -> dict[str, Any]:
    """Encrypted latency of ``model`` (``n_images``) and of the baseline (``baseline_images``, the same first test
    images) in one run; JSON-able dict with the ratio of median server-eval times (baseline / medhe).

    ``against``: another TFHE model timed on the same ``n_images`` right after ``model`` (ratio against / model);
    with it, ``baseline_images=0`` leaves the concrete-python baseline out."""
    from medhe.data import load_dataset
    from medhe.models.artifact import load_artifact

    if n_images < 1 or baseline_images < (0 if against else 1):
        raise DataError(f"the TFHE benchmark needs at least one image per row (got {n_images} and "
                        f"{baseline_images}); pass -n 1 or more")
    load_start = load_average()
    torch.set_num_threads(1)
    artifact = load_artifact(model)
    flag = (artifact.card.get("dataset") or {}).get("name", "pneumoniamnist")
    pre = artifact.preprocess()
    test = load_dataset(flag, split="test", size=pre.size, data_dir=data_dir)
    train = load_dataset(flag, split="train", size=pre.size, data_dir=data_dir)
    images = pre.batch(test.images[:n_images])
    labels = test.labels[:n_images]
    base_pre = pre.batch(test.images[:baseline_images])  # the baseline takes the same 28x28 [-1, 1] images

    _say(progress, f"compiling {artifact.name}")
    server, compile_ms, _ = _timed(compile_tfhe, artifact, "execute")
    ours = _pipeline(artifact.name, server, compile_ms / 1e3, images, progress)
    ours_logits, sim = ours.pop("_logits"), ours.pop("_sim")
    ours.update({
        "executed_equals_simulated": int(np.sum(predictions(artifact.task, ours_logits)
                                                == predictions(artifact.task, server.integer.dequantize(sim)))),
        "accuracy_on_these_images": float(np.mean(predictions(artifact.task, ours_logits) == labels[:, 0])),
    })

    result: dict[str, Any] = {"dataset": flag, "machine": machine_info(), "load_average_start": load_start,
                              "medhe": ours}
    if against:
        result.update(_against_row(against, images, labels, progress))
        result["speedup_vs_against_eval_median"] = round(result["against"]["eval_ms_median"]
                                                         / ours["eval_ms_median"], 2)
        result["speedup_vs_against_eval_cpu_median"] = round(result["against"]["latency_ms"]["eval_cpu"]["median"]
                                                             / ours["latency_ms"]["eval_cpu"]["median"], 2)
    if baseline_images < 1:
        result["load_average_end"] = load_average()
        result["note"] = ("server eval = TFHEServerModel.infer, median over images; speedup_vs_against = against / "
                          "medhe median server eval, same run, same images, one after the other")
        _say(progress, f"done: {artifact.name} {ours['eval_ms_median']:.0f} ms vs {against} "
                       f"{result['against']['eval_ms_median']:.0f} ms: {result['speedup_vs_against_eval_median']}x")
        return result
    calibration = pre.batch(train.images[:200])
    _say(progress, f"compiling the baseline ({BASELINE_NAME}); its execution takes minutes per image here")
    base_server, base_compile_ms, _ = _timed(baseline_server, calibration, seed)
    base = _pipeline("baseline", base_server, base_compile_ms / 1e3, base_pre, progress)
    base.pop("_logits"), base.pop("_sim")
    base.update({"model": BASELINE_NAME, "recipe": dict(BASELINE, seed=seed, calibration_images=len(calibration),
                                                        weights="torch default init (seeded), 4-bit symmetric")})
    result.update({
        "baseline": base,
        "speedup_eval_median": round(base["eval_ms_median"] / ours["eval_ms_median"], 2),
        "speedup_eval_cpu_median": round(base["latency_ms"]["eval_cpu"]["median"]
                                         / ours["latency_ms"]["eval_cpu"]["median"], 2),
    })
    if rounded_extra:
        _say(progress, f"extra row: {ROUNDED_NAME}")
        extra_server, extra_ms, _ = _timed(baseline_server, calibration, seed, True)
        extra = _pipeline("extra-rounded", extra_server, extra_ms / 1e3, base_pre, progress)
        extra.pop("_logits"), extra.pop("_sim")
        extra["model"] = ROUNDED_NAME
        result["extra_rounded_not_baseline"] = extra
    result["load_average_end"] = load_average()
    result["note"] = ("server eval = TFHEServerModel.infer (deserialize, Concrete server run, serialize), median over "
                      "images; speedup = baseline / medhe median server eval, same run, same images; shared machine: "
                      "compare rows of one run, and read wall times next to the load averages")
    _say(progress, f"done: medhe {ours['eval_ms_median']:.0f} ms vs baseline {base['eval_ms_median'] / 1e3:.1f} s "
                   f"server eval per image: {result['speedup_eval_median']}x")
    return result
