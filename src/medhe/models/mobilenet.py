"""MobileNetV2-style feature extractor (the public client stage) and the linear head (the private server model).

This split is what makes Paillier sound for P4's task: additive HE can evaluate exactly one affine map on
ciphertexts, so everything non-linear (depthwise convs, BN, ReLU6) runs on the client in plaintext, and only the
last linear layer — the part worth keeping private — runs on the server. The extractor ends in ReLU6 and a global
average pool, so every feature lies in [0, 6]: the server uses that bound to size its fixed-point slots.

Written from the MobileNetV2 paper (Sandler et al., 2018), not torchvision: inverted residual blocks
(1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual add when the shape allows).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from medhe.errors import ArtifactError

#: (expansion t, channels c, repeats n, first stride s) per stage — a shortened MobileNetV2 schedule that keeps
#: the full /32 downsampling but about half the blocks, so it trains on two CPU cores in minutes.
COMPACT_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
    (6, 160, 1, 2),
)
#: The paper's schedule, for users with the compute to train it.
MOBILENETV2_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
BLOCK_PRESETS = {"compact": COMPACT_BLOCKS, "mobilenetv2": MOBILENETV2_BLOCKS}
#: Upper bound of every feature the extractor emits (ReLU6 before the average pool).
FEATURE_BOUND = 6.0


def _round_channels(c: float, divisor: int = 8) -> int:
    """The paper's channel rounding: multiples of 8, never more than 10% below the requested width."""
    out = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * c else out


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection; x + block(x) when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


def _blocks(blocks: str | Sequence[Sequence[int]]) -> list[tuple[int, int, int, int]]:
    if isinstance(blocks, str):
        try:
            return list(BLOCK_PRESETS[blocks])
        except KeyError:
            raise ArtifactError(f"unknown block preset {blocks!r}: use one of {', '.join(BLOCK_PRESETS)}") from None
    out = [tuple(int(v) for v in b) for b in blocks]
    if not out or any(len(b) != 4 or min(b) < 1 for b in out):
        raise ArtifactError("blocks must be a list of [expansion, channels, repeats, stride] with positive integers")
    return out  # type: ignore[return-value]


def build_mobilenetv2_extractor(in_channels: int = 1, image_size: int = 128, width_mult: float = 0.5,
                                feature_dim: int = 32, blocks: str | Sequence[Sequence[int]] = "compact",
                                stem_channels: int = 32, head_channels: int | None = None,
                                num_outputs: int | None = None, members: Sequence[dict[str, Any]] | None = None,
                                views: Sequence[dict[str, Any]] | None = None, **_: Any) -> nn.Sequential:
    """Image (N, C, H, W) -> features (N, feature_dim) in [0, 6].

    ``feature_dim`` is the number of values the client encrypts, and each Paillier encryption costs one full-size
    modular exponentiation, so it is kept small. Without ``head_channels`` it is the width of the last 1x1 conv;
    with it, the last conv is ``head_channels`` wide (MobileNetV2's wide final layer, cheap at 4x4 pixels) and a
    Linear + BN + ReLU6 after the pool compresses to ``feature_dim`` (still bounded by 6). ``image_size`` and
    ``num_outputs`` are accepted for the zoo's uniform signature; the network is size-agnostic (global pool).
    ``members``: a list of kwargs dicts builds an ensemble instead (``build_mobilenetv2_ensemble``), optionally with
    test-time augmentation ``views`` (features averaged over fixed transforms of the image, see ``apply_view``).
    """
    if members is not None:
        return build_mobilenetv2_ensemble(members, in_channels=in_channels, image_size=image_size, views=views)
    if views is not None:
        raise ArtifactError("test-time views need the ensemble form: pass members=[{...}] with views=")
    if in_channels < 1 or feature_dim < 1 or width_mult <= 0:
        raise ArtifactError("mobilenetv2-he needs in_channels >= 1, feature_dim >= 1 and width_mult > 0")
    if image_size < 32:
        raise ArtifactError(f"mobilenetv2-he downsamples by 32: image_size {image_size} is too small (use >= 32)")
    cin = _round_channels(stem_channels * width_mult)
    layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, stride=2)]
    for t, c, n, s in _blocks(blocks):
        cout = _round_channels(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    if head_channels:
        layers += [_conv_bn(cin, head_channels, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(head_channels, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU6()]
    else:
        layers += [_conv_bn(cin, feature_dim, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


VIEW_KEYS = {"flip", "scale", "dx", "dy", "rotate_deg"}


def check_views(views: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Validate test-time views: dicts with optional flip (bool), scale (zoom > 0), dx/dy (fraction of the side,
    |.| <= 0.5) and rotate_deg (|.| <= 45)."""
    out = []
    if not views:
        raise ArtifactError("views must be a non-empty list of transforms (use [{}] for the image itself)")
    for v in views:
        if not isinstance(v, dict) or set(v) - VIEW_KEYS:
            raise ArtifactError(f"a test-time view is a dict with keys among {sorted(VIEW_KEYS)}, not {v!r}")
        view = {"flip": float(bool(v.get("flip", False))), "scale": float(v.get("scale", 1.0)),
                "dx": float(v.get("dx", 0.0)), "dy": float(v.get("dy", 0.0)),
                "rotate_deg": float(v.get("rotate_deg", 0.0))}
        if not (0.5 <= view["scale"] <= 2.0 and abs(view["dx"]) <= 0.5 and abs(view["dy"]) <= 0.5
                and abs(view["rotate_deg"]) <= 45):
            raise ArtifactError(f"test-time view {v!r} is out of range (scale 0.5..2, |dx|,|dy| <= 0.5, "
                                "|rotate_deg| <= 45)")
        out.append(view)
    return out


def apply_view(x: torch.Tensor, view: dict[str, float]) -> torch.Tensor:
    """A fixed affine transform of a (N, C, H, W) batch (zoom ``scale``, shift, rotation, horizontal flip), with
    the border replicated like the training augmentation; the identity view returns ``x`` unchanged."""
    if view["scale"] == 1.0 and not (view["flip"] or view["dx"] or view["dy"] or view["rotate_deg"]):
        return x
    import math

    from medhe.models.augment import affine_warp

    def each(v: float) -> torch.Tensor:  # float64, as the view's numbers are: one value for every image
        return torch.full((x.shape[0],), v, dtype=torch.float64)

    return affine_warp(x, each(math.radians(view["rotate_deg"])), each(view["scale"]),
                       each(-1.0 if view["flip"] else 1.0), each(2 * view["dx"]), each(2 * view["dy"]))


class ConcatFeatures(nn.Module):
    """Several extractors side by side, features concatenated: an ensemble whose logits stay one affine map.

    Each member sees the input resized (bilinear, antialiased) to the size it was trained at, if that differs.
    With ``views`` (test-time augmentation, all on the client) each member's features are averaged over those
    fixed transforms of the image: a mean of values in [0, 6] stays in [0, 6], and the server's head is unchanged.
    """

    def __init__(self, members: Sequence[nn.Module], sizes: Sequence[int],
                 views: Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.sizes = [int(s) for s in sizes]
        self.views = check_views(views) if views is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views is not None:
            return torch.stack([self._concat(apply_view(x, v)) for v in self.views]).mean(0)
        return self._concat(x)

    def _concat(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for member, size in zip(self.members, self.sizes):
            xi = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                               align_corners=False)
            feats.append(member(xi))
        return torch.cat(feats, dim=1)


def build_mobilenetv2_ensemble(members: Sequence[dict[str, Any]], views: Sequence[dict[str, Any]] | None = None,
                               **common: Any) -> nn.Sequential:
    """Extractors built from each member's kwargs (over ``common``); features = their concatenation.

    Averaging the members' logits is a linear head over the concatenated features, so an ensemble still runs as
    one Paillier evaluation; it costs the client one extractor pass and ``feature_dim`` encryptions per member.
    """
    if not members:
        raise ArtifactError("an extractor ensemble needs at least one member")
    specs = [{**common, **m} for m in members]
    return nn.Sequential(ConcatFeatures([build_mobilenetv2_extractor(**k) for k in specs],
                                        [k.get("image_size", 128) for k in specs], views))


def build_linear_head(in_features: int = 32, num_outputs: int = 2, **_: Any) -> nn.Sequential:
    """The private server model: one affine map features -> logits (all that additive HE can evaluate)."""
    if in_features < 1 or num_outputs < 1:
        raise ArtifactError("linear-head needs in_features >= 1 and num_outputs >= 1")
    return nn.Sequential(nn.Linear(in_features, num_outputs))
