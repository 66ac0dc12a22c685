"""Fold BatchNorm into the preceding Conv2d/Linear so the encrypted network has one linear layer fewer per BN.

In eval mode BN is the per-feature affine map y = (x - mean) * gamma / sqrt(var + eps) + beta; merging it into the
weights and bias of the layer before it costs nothing at inference and, under CKKS, saves a rescale (one level)
per BN. Layers that commute with a per-channel affine map may sit in between: Flatten, Dropout and Identity
(identity at inference) and AvgPool2d (averages each channel separately, so it commutes with BN2d).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from medhe.errors import PlanError
from medhe.models.layers import Residual

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_TRANSPARENT = (nn.Flatten, nn.Dropout, nn.Identity, nn.AvgPool2d)


def fold_batchnorm(model: nn.Module) -> nn.Sequential:
    """A copy of ``model`` (eval mode) with every BatchNorm merged into the Conv2d/Linear before it.

    Raises ``PlanError`` naming the BN when nothing linear precedes it (e.g. BN straight after an activation).
    The input is left untouched; activation modules (with their recorded ranges) are carried over.
    """
    if not isinstance(model, nn.Sequential):
        raise PlanError(f"BN folding needs an nn.Sequential, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    return _fold_sequential(folded, prefix="")


def _fold_sequential(seq: nn.Sequential, prefix: str) -> nn.Sequential:
    kept: list[nn.Module] = []
    names: list[str] = []
    for name, mod in seq.named_children():
        qual = f"{prefix}{name}"
        if isinstance(mod, _BN):
            _fold_into_previous(mod, kept, names, qual)
            continue
        if isinstance(mod, nn.Sequential):
            mod = _fold_sequential(mod, prefix=f"{qual}.")
        elif isinstance(mod, Residual) and isinstance(mod.body, nn.Sequential):
            mod.body = _fold_sequential(mod.body, prefix=f"{qual}.body.")
        kept.append(mod)
        names.append(qual)
    return nn.Sequential(*kept).eval()


def _fold_into_previous(bn: nn.Module, kept: list[nn.Module], names: list[str], where: str) -> None:
    scale, shift = _bn_affine(bn, where)
    through_flatten = False
    for i in range(len(kept) - 1, -1, -1):
        layer = kept[i]
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            _merge(layer, scale, shift, through_flatten, where, names[i])
            return
        if not isinstance(layer, _TRANSPARENT):
            break
        through_flatten |= isinstance(layer, nn.Flatten)
    before = f"{type(kept[-1]).__name__} {names[-1]!r}" if kept else "nothing"
    raise PlanError(f"BatchNorm {where!r} follows {before}, not a Conv2d/Linear: it cannot be folded; "
                    "put each BatchNorm right after a Conv2d or Linear layer")


def _bn_affine(bn: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature (scale, shift) of an eval-mode BatchNorm."""
    if bn.running_mean is None or bn.running_var is None:
        raise PlanError(f"BatchNorm {where!r} keeps no running statistics (track_running_stats=False): "
                        "it cannot be folded; train with running statistics")
    with torch.no_grad():
        inv = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
        scale = gamma * inv
        shift = beta - bn.running_mean.double() * scale
    return scale, shift


def _merge(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor, through_flatten: bool,
           bn_name: str, layer_name: str) -> None:
    out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    if isinstance(layer, nn.Conv2d) and through_flatten:
        scale, shift = _per_channel(scale, shift, out, bn_name, layer_name)
    elif scale.numel() != out:
        raise PlanError(f"BatchNorm {bn_name!r} has {scale.numel()} features but {layer_name!r} gives {out}: "
                        "it cannot be folded")
    with torch.no_grad():
        w = layer.weight.double()
        shape = (-1,) + (1,) * (w.dim() - 1)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros(out, dtype=torch.float64)
        new_w = (w * scale.view(shape)).to(layer.weight.dtype)
        new_b = (bias * scale + shift).to(layer.weight.dtype)
        layer.weight.copy_(new_w)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b)
        else:
            layer.bias.copy_(new_b)


def _per_channel(scale: torch.Tensor, shift: torch.Tensor, channels: int, bn_name: str,
                 layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BN1d over a flattened conv output folds only if it is constant over each channel's positions."""
    n = scale.numel()
    if n % channels:
        raise PlanError(f"BatchNorm {bn_name!r} has {n} features, not a multiple of the {channels} channels of "
                        f"{layer_name!r}: it cannot be folded")
    s, t = scale.view(channels, -1), shift.view(channels, -1)
    if not (torch.allclose(s, s[:, :1].expand_as(s), rtol=1e-6, atol=1e-9)
            and torch.allclose(t, t[:, :1].expand_as(t), rtol=1e-6, atol=1e-9)):
        raise PlanError(f"BatchNorm {bn_name!r} normalises each position of {layer_name!r}'s feature maps "
                        "separately: it cannot be folded into a convolution; use BatchNorm2d before Flatten")
    return s[:, 0].contiguous(), t[:, 0].contiguous()
