"""The TenSEAL Tutorial-4 reference computes what the torch model computes (within CKKS precision at 2^26)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from medhe.data import load_dataset
from medhe.errors import PlanError
from medhe.he.ckks.tenseal_ref import TenSEALTutorial4, plaintext_logits, tutorial4_model


def test_reference_refuses_other_networks():
    with pytest.raises(PlanError, match="tenseal-tutorial4"):
        TenSEALTutorial4(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.Flatten(), nn.Linear(676, 10)))


def test_tutorial4_model_has_the_tutorial_shape():
    model = tutorial4_model()
    conv, fc1, fc2 = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (1, 4, (7, 7), (3, 3))
    assert (fc1.in_features, fc1.out_features, fc2.out_features) == (256, 64, 10)


@pytest.mark.slow
def test_reference_matches_torch_logits_on_real_images():
    ds = load_dataset("pneumoniamnist", split="test")
    images = (ds.images[:2].astype(np.float32) / 255.0 - 0.5) / 0.5
    model = tutorial4_model(seed=1)
    ref = TenSEALTutorial4(model)
    out = ref.run(images)
    expected = plaintext_logits(model, images)
    assert out["logits"].shape == (2, 10)
    # scale 2^26 with two squarings: TenSEAL's tutorial reports ~1e-3 absolute error at these magnitudes
    assert np.max(np.abs(out["logits"] - expected)) < 2e-2
    assert out["input_bytes"] > 0 and out["key_bytes"] > out["input_bytes"]
    assert len(out["eval_s"]) == 2 and min(out["eval_s"]) > 0


@pytest.mark.slow
def test_ckks_benchmark_runs_all_three_side_by_side_and_is_json():
    import json

    from medhe.he.ckks.bench import format_summary, run_ckks_benchmark

    report = run_ckks_benchmark(n_images=1, n_reference=1, progress=False)
    json.dumps(report)  # JSON-able as is
    for key in ("tenseal_tutorial4", "medhe_tutorial4", "medhe_default"):
        assert report[key]["latency_ms"]["eval"]["median"] > 0
        assert report[key]["quality"]["argmax_agreement"] == 1.0
    # trained weights stay inside TenSEAL's output range, so its logits are checked too
    assert report["tenseal_tutorial4"]["quality"]["plain_max_abs_logit"] < 16
    assert report["tenseal_tutorial4"]["quality"]["max_abs_logit_error"] < 0.5
    raw = report["medhe_default"]["bytes"]["raw"]
    assert raw["input_ciphertext"] > report["medhe_default"]["bytes"]["input_ciphertext"]
    assert raw["evaluation_keys"] > report["medhe_default"]["bytes"]["evaluation_keys"]
    assert report["ratios"]["eval_identical_work"] > 1
    for params in (report["params"], report["medhe_default"]["params"], report["medhe_tutorial4"]["params"]):
        assert params["backend"] in ("seal", "native") and params["security_bits"] >= 128
    assert "TenSEAL / medhe" in format_summary(report)
