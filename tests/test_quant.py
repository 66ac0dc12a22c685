"""QAT FCNN: the torch forward pass is exactly the integer program the TFHE circuit runs, and it trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medhe.errors import ArtifactError
from medhe.models.artifact import load_artifact, save_artifact
from medhe.models.quant import QFCNN, accumulator_plan, build_qfcnn, round_lsbs, signed_bits
from medhe.models.zoo import build_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Preprocessed-like images: pixel/255 normalised with mean = std = 0.5, so exactly in [-1, 1]."""
    rng = np.random.default_rng(seed)
    pix = rng.integers(0, 256, (n, 1, size, size)).astype(np.float32)
    return torch.from_numpy((pix / 255 - 0.5) / 0.5)


_CACHE: dict = {}


def _trained(seed: int = 0, steps: int = 15, **kw) -> QFCNN:
    key = (seed, steps, repr(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = _train(seed, steps, **kw)
    return _CACHE[key]


def _train(seed: int, steps: int, **kw) -> QFCNN:
    torch.manual_seed(seed)
    model = build_qfcnn(**{"hidden": 8, "quant_bits": 3, "input_bits": 3, "act_bits": 3, "acc_bits": 5,
                           "pool": 2, **kw})
    x = _images(64, seed=seed)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_forward_equals_integer_program():
    model = _trained()
    x = _images(200, seed=1)
    with torch.no_grad():
        logits = model(x).double().numpy()
    integer = model.export_integer()
    assert np.allclose(logits, integer.predict_logits(x.numpy()), rtol=1e-5, atol=1e-6)


def test_two_hidden_layers_and_per_layer_bits():
    model = _trained(hidden=[8, 6], quant_bits=[4, 3, 3], act_bits=[3, 2], acc_bits=[6, 5])
    x = _images(50, seed=2)
    with torch.no_grad():
        logits = model(x).double().numpy()
    integer = model.export_integer()
    assert len(integer.layers) == 3
    assert np.allclose(logits, integer.predict_logits(x.numpy()), rtol=1e-5, atol=1e-6)
    card = model.quantization_card()
    assert [layer["weight_bits"] for layer in card["layers"]] == [4, 3, 3]
    assert card["layers"][1]["act_bits"] == 2


def test_training_reduces_loss_through_straight_through_rounding():
    torch.manual_seed(0)
    model = build_qfcnn(hidden=8, quant_bits=3, input_bits=3, act_bits=3, acc_bits=5, pool=2)
    x = _images(64)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    loss0 = torch.nn.functional.cross_entropy(model(x), y)
    loss0.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    trained = _trained()
    assert torch.nn.functional.cross_entropy(trained(x), y) < loss0


def test_worst_case_accumulator_bounds_hold_and_rounding_never_overflows():
    integer = _trained().export_integer()
    layer = integer.layers[0]
    lo, hi = layer.acc_range
    # the extreme inputs of every neuron reach, but never exceed, the recorded worst case
    top = integer.input_levels
    extremes = np.concatenate([np.where(layer.weight > 0, top, 0), np.where(layer.weight < 0, top, 0)])
    acc = extremes @ layer.weight.T + layer.bias
    assert acc.max() == hi and acc.min() == lo
    half = 2 ** (layer.acc_bits - 1)
    assert -half <= lo and (round_lsbs(np.int64(hi), layer.lsbs) << layer.lsbs) <= half - 1


@pytest.mark.parametrize("lo,hi,keep", [(-100, 100, 4), (-1000, 1023, 5), (0, 255, 3), (-8, 7, 6), (-5, 4, None)])
def test_accumulator_plan(lo, hi, keep):
    bits, k = accumulator_plan(lo, hi, keep)
    assert -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1
    if keep is None or signed_bits(lo, hi) <= keep:
        assert k == 0
    else:
        assert bits - k == keep
        assert (((hi + 2 ** (k - 1)) >> k) << k) <= 2 ** (bits - 1) - 1


def test_round_lsbs_matches_bit_pattern_rounding():
    v = np.arange(-64, 64)
    for k in (1, 2, 3):
        expected = np.floor(v / 2 ** k + 0.5).astype(np.int64)  # ties round up, like Concrete's bit pattern
        assert np.array_equal(round_lsbs(v, k), expected)
        assert np.array_equal(round_lsbs(torch.tensor(v, dtype=torch.float32), k).numpy(), expected)


def test_float_mode_is_close_but_unquantized():
    model = _trained()
    x = _images(20, seed=3)
    with torch.no_grad():
        q = model(x)
        model.quantized = False
        f = model(x)
    model.quantized = True
    assert not torch.equal(q, f)
    assert torch.isfinite(f).all()


def test_zoo_builds_qfcnn_and_artifact_round_trip(tmp_path):
    model = build_model("qfcnn", in_channels=1, num_outputs=2, image_size=28, hidden=8, quant_bits=3)
    assert isinstance(model, QFCNN)
    trained = _trained()
    card = {"name": "tiny-qfcnn", "arch": "qfcnn",
            "arch_kwargs": {"hidden": 8, "quant_bits": 3, "input_bits": 3, "act_bits": 3, "acc_bits": 5, "pool": 2},
            "task": "binary-class", "labels": ["a", "b"], "preprocessing": {"channels": 1, "size": 28},
            "quantization": trained.quantization_card(), "scheme_options": {"default_scheme": "tfhe"}}
    save_artifact(tmp_path / "m", trained, card)
    loaded = load_artifact(tmp_path / "m")
    a, b = trained.export_integer(), loaded.model.export_integer()
    assert all(np.array_equal(x.weight, y.weight) and np.array_equal(x.bias, y.bias) for x, y in zip(a.layers, b.layers))
    assert np.array_equal(a.layers[0].table, b.layers[0].table)


@pytest.mark.parametrize("kwargs,match", [
    ({"quant_bits": 1}, "weight bits"),
    ({"input_bits": 9}, "input_bits"),
    ({"act_bits": [3, 3]}, "act_bits lists 2"),
    ({"hidden": []}, "hidden"),
    ({"pool": 0}, "pool"),
    ({"nonsense": 1}, "does not take"),
])
def test_builder_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ArtifactError, match=match):
        build_qfcnn(**kwargs)
