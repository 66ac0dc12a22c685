"""HE-friendly layers and the zoo's architectures: shapes, gradients, range recording, shared activations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from medhe.errors import PlanError
from medhe.models import layers
from medhe.models.architectures import (build_fcnn, build_hecnn, build_hefnet_se, build_lenet5_he,
                                        build_tenseal_tutorial4)
from medhe.models.layers import CubicSigmoid, HESqueezeExcite, PolyAct, ReLUApprox, Residual
from medhe.models.zoo import build_model

BUILDERS = {
    "fcnn": build_fcnn,
    "hecnn": build_hecnn,
    "lenet5-he": build_lenet5_he,
    "hefnet-se": build_hefnet_se,
    "tenseal-tutorial4": build_tenseal_tutorial4,
}


def test_polyact_computes_its_polynomial_and_gradients_reach_coefficients():
    act = PolyAct((0.5, -1.0, 2.0))
    x = torch.linspace(-3, 3, 7, requires_grad=True)
    y = act(x)
    assert torch.allclose(y, 0.5 * x * x - x + 2.0)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in (act.a, act.b, act.c))
    assert x.grad is not None
    assert act.coefficients() == [2.0, -1.0, 0.5]


def test_polyact_relu_init_approximates_relu():
    act = PolyAct("relu", init_range=4.0)
    x = torch.linspace(-4, 4, 101)
    assert (act(x) - torch.relu(x)).abs().max() < 0.6
    assert PolyAct("identity")(x).allclose(x)


def test_range_recording_tracks_min_max_and_can_be_reset_or_paused():
    act = PolyAct()
    assert act.observed_range() is None
    act(torch.tensor([-2.0, 0.5]))
    act(torch.tensor([1.5, 3.0]))
    assert act.observed_range() == (-2.0, 3.0)
    act.recording = False
    act(torch.tensor([100.0]))
    assert act.observed_range() == (-2.0, 3.0)
    act.reset_range()
    assert act.observed_range() is None


def test_relu_approx_is_fixed_and_cubic_sigmoid_matches_its_coefficients():
    approx = ReLUApprox(input_range=2.0)
    assert not list(approx.parameters())
    x = torch.linspace(-2, 2, 41)
    c, b, a = approx.coefficients()
    assert torch.allclose(approx(x), a * x * x + b * x + c)
    fixed = CubicSigmoid(trainable=False)
    assert not list(fixed.parameters())
    assert torch.allclose(fixed(torch.tensor([0.0])), torch.tensor([0.5]))
    gate = CubicSigmoid()
    assert len(list(gate.parameters())) == 3
    c0, c1, c2, c3 = gate.coefficients()
    assert c2 == 0.0 and math.isclose(c3, -1e-5, rel_tol=1e-4)


def test_squeeze_excite_and_residual_keep_the_shape_and_pass_gradients():
    x = torch.randn(3, 16, 7, 7, requires_grad=True)
    se = HESqueezeExcite(16, reduction=4)
    y = se(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert se.fc1.weight.grad is not None and se.gate.a.grad is not None and x.grad is not None
    res = Residual(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), PolyAct()))
    assert res(x).shape == x.shape


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_every_architecture_is_he_friendly_and_gives_one_logit_per_class(arch, in_channels, size):
    model = build_model(arch, in_channels=in_channels, num_outputs=3, image_size=size)
    assert isinstance(model, nn.Sequential)
    layers.check_he_friendly(model)
    x = torch.randn(4, in_channels, size, size)
    out = model(x)
    assert out.shape == (4, 3)
    out.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert len(layers.activation_sites(model)) >= (1 if arch == "fcnn" else 2)  # fcnn: one hidden layer by default


def test_hecnn_default_is_the_cheap_ckks_shape():
    model = build_hecnn()
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "BatchNorm2d", "PolyAct", "Flatten", "Linear", "BatchNorm1d", "PolyAct", "Linear"]
    conv, fc1, fc2 = model[0], model[4], model[7]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (1, 8, (5, 5), (2, 2),
                                                                                                 (2, 2))
    assert (fc1.in_features, fc1.out_features, fc2.out_features) == (8 * 14 * 14, 32, 2)
    wider = build_hecnn(channels=16, hidden=64, dropout=0.2)
    assert wider[4 + 1].in_features == 16 * 14 * 14 and any(isinstance(m, nn.Dropout) for m in wider)


def test_tenseal_tutorial4_has_fixed_squares_and_the_tutorial_sizes():
    model = build_tenseal_tutorial4(num_outputs=10)
    conv, sq, fc1 = model[0], model[1], model[3]
    assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (4, (7, 7), (3, 3), (0, 0))
    assert (fc1.in_features, fc1.out_features, model[5].out_features) == (256, 64, 10)
    assert sq.coefficients() == [0.0, 0.0, 1.0] and not sq.a.requires_grad
    x = torch.randn(2, 4)
    assert torch.allclose(sq(x), x * x)


def test_shared_activation_is_one_instance_recording_every_site():
    model = build_hecnn(shared_act=True)
    sites = layers.activation_sites(model)
    assert len(sites) == 1
    assert model[2] is model[6]
    model.eval()
    model(torch.randn(8, 1, 28, 28))
    ranges = layers.activation_ranges(model)
    assert list(ranges) == ["2"] and ranges["2"][0] < ranges["2"][1]
    sep = build_hefnet_se(shared_act=True)
    assert len(layers.activation_sites(sep)) == 1 + len((16, 32, 32))  # one quadratic plus one gate per stage


def test_check_he_friendly_names_the_offending_layer():
    bad = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(PlanError, match="'1' is ReLU"):
        layers.check_he_friendly(bad)
    with pytest.raises(PlanError, match="MaxPool2d"):
        layers.check_he_friendly(nn.Sequential(nn.MaxPool2d(2)))


def test_too_small_images_are_rejected_with_a_plan_error():
    with pytest.raises(PlanError, match="too small"):
        build_lenet5_he(image_size=8)
    assert np.isfinite(build_hecnn(image_size=16)(torch.randn(2, 1, 16, 16)).detach().numpy()).all()
