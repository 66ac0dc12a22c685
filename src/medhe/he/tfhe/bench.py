"""``medhe bench --scheme tfhe``: medhe's TFHE model against a plain concrete-python FCNN, in the same run.

The baseline is the conventional recipe: 784 -> 64 -> 2 with 4-bit inputs, weights and activations, no pooling,
no accumulator-aware training, and Concrete's exact ``round_bit_pattern`` down to 6 bits before each table lookup
(the recipe behind reference.md's measured 576-PBS / 12.9 MB-input baseline). Without any rounding the 13-bit
lookups need 1 GB of keys and took over 10 minutes per image on the 2-core machine, which is no usable yardstick.
Both circuits go through the same client/server byte path, on the same images, one after the other, so the
ratio holds even on a shared, noisy machine (absolute times do not: report medians and the machine).
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

import numpy as np
import torch

from medhe.he.evaluate import run_encrypted
from medhe.he.tfhe import compile_tfhe
from medhe.he.tfhe.server import TFHEServerModel
from medhe.models.metrics import predictions
from medhe.models.quant import build_qfcnn

log = logging.getLogger(__name__)

BASELINE = {"hidden": 64, "quant_bits": 4, "input_bits": 4, "act_bits": 4, "acc_bits": 6, "pool": 1,
            "range_penalty": 0.0}


def baseline_server(calibration_images: np.ndarray, seed: int = 0) -> TFHEServerModel:
    """The 784 -> 64 -> 2 4-bit baseline circuit (torch's default init, seeded: timing depends on widths only).

    Accumulators keep their worst-case widths (16 bits here) and are rounded exactly to 6 bits, one bootstrap per
    removed bit, as Concrete does without approximate rounding."""
    torch.manual_seed(seed)
    model = build_qfcnn(in_channels=1, num_outputs=2, image_size=28, **BASELINE)
    model.eval()
    integer = model.export_integer()
    card = {"name": "baseline-fcnn-784-64-2-4bit", "task": "binary-class", "labels": ["0", "1"]}
    return TFHEServerModel(integer, card, mode="execute", exactness="exact",
                           calibration=integer.quantize_input(calibration_images))


def _measure(server: TFHEServerModel, images: np.ndarray) -> dict[str, Any]:
    t0 = time.perf_counter()
    log.info("running %d images encrypted (%s)", len(images), server.card.get("name"))
    run = run_encrypted(server, images, progress=False, desc="tfhe bench")
    wall = time.perf_counter() - t0
    p = server.params
    return {
        "n_images": int(len(images)),
        "latency_ms": run["latency_ms"],
        "eval_ms_median": run["latency_ms"]["eval"]["median"],
        "bytes": run["bytes"],
        "pbs_count": p["pbs_count"],
        "accumulator_bits": p["accumulator_bits"],
        "tlu_input_bits": p.get("tlu_input_bits"),
        "max_bit_width": p["max_bit_width"],
        "evaluation_key_bytes": p.get("bootstrap_key_bytes", 0) + p.get("keyswitch_key_bytes", 0),
        "p_error": p["p_error"],
        "security_bits": p["security_bits"],
        "wall_s": round(wall, 1),
        "_logits": run["logits"],
    }


def run_tfhe_benchmark(model: str = "pneumoniamnist-qfcnn", n_images: int = 10, data_dir: Any = None,
                       baseline_images: int = 2, seed: int = 0) -> dict[str, Any]:
    """Encrypted latency of ``model`` and of the baseline on the first test images; JSON-able dict."""
    from medhe.data import load_dataset
    from medhe.models.artifact import load_artifact

    torch.set_num_threads(1)
    artifact = load_artifact(model)
    flag = (artifact.card.get("dataset") or {}).get("name", "pneumoniamnist")
    pre = artifact.preprocess()
    test = load_dataset(flag, split="test", size=pre.size, data_dir=data_dir)
    train = load_dataset(flag, split="train", size=pre.size, data_dir=data_dir)
    images = pre.batch(test.images[:n_images])
    labels = test.labels[:n_images]

    t0 = time.perf_counter()
    log.info("compiling %s", artifact.name)
    server = compile_tfhe(artifact, fhe="execute")
    compile_s = time.perf_counter() - t0
    ours = _measure(server, images)
    sim = server.integer.dequantize(server.simulate(server.integer.quantize_input(images)))
    ours_logits = ours.pop("_logits")
    ours.update({
        "model": artifact.name,
        "compile_s": round(compile_s, 2),
        "params": server.params,
        "executed_equals_simulated": int(np.sum(predictions(artifact.task, ours_logits)
                                                == predictions(artifact.task, sim))),
        "accuracy_on_these_images": float(np.mean(predictions(artifact.task, ours_logits) == labels[:, 0])),
    })

    t0 = time.perf_counter()
    log.info("compiling the baseline")
    base_server = baseline_server(pre.batch(train.images[:200]), seed=seed)
    base_compile = time.perf_counter() - t0
    base = _measure(base_server, images[:baseline_images])
    base.pop("_logits")
    base.update({"model": "concrete-python FCNN 784-64-2, 4-bit, exact rounding to 6 bits",
                 "compile_s": round(base_compile, 2),
                 "params": base_server.params})
    return {
        "dataset": flag,
        "host": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "medhe": ours,
        "baseline": base,
        "speedup_eval_median": round(base["eval_ms_median"] / ours["eval_ms_median"], 2),
        "note": "medians over images; shared machine, so compare the two rows of this run, not across runs",
    }
