"""BatchNorm folding: the folded network computes the same logits without any BN layer."""

import pytest
import torch
from torch import nn

from medhe.errors import PlanError
from medhe.models.architectures import build_hecnn, build_hefnet_se, build_lenet5_he
from medhe.models.folding import fold_batchnorm
from medhe.models.layers import PolyAct, Residual, set_recording


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=gen))
            mod.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            with torch.no_grad():
                mod.weight.copy_(torch.randn(n, generator=gen))
                mod.bias.copy_(torch.randn(n, generator=gen))
    set_recording(model, False)  # forward passes below must not change the state we compare
    return model.eval()


def _assert_equivalent(model: nn.Module, x: torch.Tensor) -> nn.Sequential:
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    with torch.no_grad():
        diff = (model(x) - folded(x)).abs().max().item()
    assert diff < 1e-5, diff
    return folded


def test_conv_bn2d_folds_exactly():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), PolyAct()))
    folded = _assert_equivalent(model, torch.randn(4, 3, 9, 9))
    assert len(folded) == 2


def test_linear_bn1d_folds_exactly_also_without_bias():
    model = _randomise_bn(nn.Sequential(nn.Flatten(), nn.Linear(20, 7, bias=False), nn.BatchNorm1d(7), PolyAct(),
                                        nn.Linear(7, 2)))
    _assert_equivalent(model, torch.randn(5, 4, 5))


def test_bn2d_after_average_pooling_folds_into_the_conv_before_it():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2), nn.BatchNorm2d(4)))
    _assert_equivalent(model, torch.randn(3, 1, 10, 10))


def test_bn1d_through_a_flatten_folds_when_it_is_per_channel():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.BatchNorm1d(3)))
    _assert_equivalent(model, torch.randn(4, 2, 3, 3))  # 1x1 feature maps


def test_per_position_bn1d_after_a_conv_is_refused():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.BatchNorm1d(2 * 4 * 4)))
    with pytest.raises(PlanError, match="BatchNorm '2'.*cannot be folded"):
        fold_batchnorm(model)


def test_bn_after_an_activation_is_refused_naming_the_layer():
    model = _randomise_bn(nn.Sequential(nn.Linear(4, 4), PolyAct(), nn.BatchNorm1d(4)))
    with pytest.raises(PlanError) as err:
        fold_batchnorm(model)
    assert "'2'" in str(err.value) and "PolyAct" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PlanError, match="follows nothing"):
        fold_batchnorm(_randomise_bn(nn.Sequential(nn.BatchNorm1d(4))))


@pytest.mark.parametrize("builder", [build_hecnn, build_lenet5_he, build_hefnet_se])
def test_whole_architectures_fold_and_the_original_is_untouched(builder):
    model = _randomise_bn(builder(num_outputs=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _assert_equivalent(model, torch.randn(6, 1, 28, 28))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bn_inside_a_residual_body_folds():
    body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), PolyAct())
    model = _randomise_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Residual(body)))
    _assert_equivalent(model, torch.randn(2, 1, 6, 6))
