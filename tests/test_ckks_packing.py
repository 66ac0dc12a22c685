"""The compiler's slot arithmetic, checked exactly: compiled programs run on the plaintext slot simulator
(the same instruction stream SEAL runs, without noise) must equal the torch forward pass to float precision.
This sweeps layer shapes cheaply (strides, padding, groups, pooling, channels, positions); the encrypted
tests (test_ckks_engine, test_ckks_layers) then check precision under real encryption."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medhe.he.ckks import compile_plan
from medhe.he.ckks.compiler.program import naf
from medhe.he.ckks.simulate import simulate
from medhe.models.layers import CubicSigmoid, HESqueezeExcite, PolyAct, ReLUApprox, Residual


def _bn(n: int, dims: int = 2) -> nn.Module:
    bn = nn.BatchNorm2d(n) if dims == 2 else nn.BatchNorm1d(n)
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 1.5)
    return bn


def _check(model: nn.Sequential, shape: tuple[int, ...], **opts) -> None:
    model.eval()
    x = torch.rand(1, *shape) * 2 - 1
    want = model(x).detach().double().numpy()[0]
    plan = compile_plan(model, shape, **opts)
    got = simulate(plan, x.numpy()[0])
    assert np.abs(got - want).max() < 1e-6 * max(1.0, np.abs(want).max()), plan.summary()


@pytest.mark.parametrize("stride,padding,groups,kernel", [(1, 0, 1, 3), (1, 1, 2, 3), (2, 1, 1, 3), (2, 2, 1, 5),
                                                          (3, 0, 1, 7), (2, 1, 4, 3), (1, 2, 1, 5)])
def test_second_convolution_any_stride_padding_groups(stride, padding, groups, kernel):
    torch.manual_seed(stride * 10 + padding)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _bn(4), PolyAct((0.1, 0.5, 0.1)),
                          nn.Conv2d(4, 8, kernel, stride=stride, padding=padding, groups=groups), _bn(8),
                          PolyAct((0.2, 0.3, 0.0)), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 12, 12))
    _check(model, (1, 12, 12))


@pytest.mark.parametrize("channels", [1, 3])
def test_pooling_residual_and_se_on_rgb_and_gray(channels):
    torch.manual_seed(channels)
    model = nn.Sequential(nn.Conv2d(channels, 4, 3, stride=2, padding=1), _bn(4), ReLUApprox(3.0),
                          nn.AvgPool2d(2), Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), _bn(4))),
                          HESqueezeExcite(4, reduction=2, trainable_gate=False), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 6))
    _check(model, (channels, 16, 16))


def test_dense_models_and_cubic_activation():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), _bn(40, 1), PolyAct((0.05, 0.8, -0.2)),
                          nn.Linear(40, 12), CubicSigmoid(trainable=False), nn.Linear(12, 5))
    _check(model, (1, 8, 8))


def test_identity_like_activation_folds_away():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), PolyAct("identity"), nn.Linear(8, 2))
    plan = compile_plan(model.eval(), (1, 4, 4))
    assert plan.depth == 1  # the two linear layers and the affine activation became one matrix
    _check(model, (1, 4, 4))


def test_power_of_two_key_paths_still_compute_the_same():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct((0.1, 0.5, 0.0)), nn.Flatten(), nn.Linear(128, 4))
    plan = compile_plan(model.eval(), (1, 8, 8), max_key_bytes=1)
    assert plan.key_paths and all(abs(s) & (abs(s) - 1) == 0 for s in plan.rotation_steps)
    _check(model, (1, 8, 8), max_key_bytes=1)


@pytest.mark.parametrize("step", [1, 3, 7, 12, -16, 1000, -2047])
def test_naf_sums_to_the_step(step):
    assert sum(naf(step)) == step


def test_residual_whose_branches_end_in_activations():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _bn(4), PolyAct((0.1, 0.5, 0.1)),
                          Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), PolyAct((0.2, 0.4, 0.0)))),
                          HESqueezeExcite(4, reduction=4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    _check(model, (2, 6, 6))


def test_input_over_budget_is_sent_once_and_convolved_with_rotations():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), _bn(4), PolyAct((0.1, 0.5, 0.0)), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    assert compile_plan(model.eval(), (3, 8, 8)).input_ciphertexts == 3  # 75 taps, 2 x 16 per ciphertext
    plan = compile_plan(model.eval(), (3, 8, 8), max_input_bytes=1)
    assert plan.input_ciphertexts == 1 and plan.strategies[0].endswith(":direct")
    _check(model, (3, 8, 8), max_input_bytes=1)


def test_complex_packing_halves_the_input_ciphertexts():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 8, 5, 2, 2), _bn(8), PolyAct((0.1, 0.5, 0.2)), nn.Flatten(),
                          nn.Linear(1568, 4))
    plan = compile_plan(model.eval(), (1, 28, 28))
    assert plan.input_complex and plan.input_ciphertexts == 7 and 0 in plan.rotation_steps
    _check(model, (1, 28, 28))


def test_negative_and_negligible_quadratic_terms():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), PolyAct((-0.2, 0.7, 0.1)), nn.Linear(8, 3))
    _check(model, (1, 4, 4))
    tiny = PolyAct((1e-14, 0.9, 0.0))
    tiny.input_min.fill_(-3.0)
    tiny.input_max.fill_(3.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), tiny, nn.Linear(8, 3)).eval()
    assert compile_plan(model, (1, 4, 4)).depth == 1  # the 1e-14 x^2 term is dropped, not divided by
