"""HE-friendly network builders, registered by name in ``medhe.models.zoo.ARCHS``.

Every builder takes ``(in_channels=1, num_outputs=2, image_size=28, **kw)`` and returns an ``nn.Sequential`` of
layers from ``medhe.models.layers`` only (polynomial activations, average pooling, BatchNorm that folds away), so
each one compiles for every encrypted backend. ``shared_act=True`` uses one activation instance at every site
(P1's shared quadratic: fewer parameters and one polynomial for the compilers to handle).
Layer sizes are computed from ``image_size`` so one builder serves 28x28 MedMNIST and larger folder images.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from medhe.errors import PlanError
from medhe.models.layers import HESqueezeExcite, PolyAct, ReLUApprox

#: activation kinds every builder with an ``act`` option accepts (``medhe train --act``).
ACTS = ("poly", "relu2")


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a convolution or pooling."""
    return (size + 2 * padding - kernel) // stride + 1


def _act_factory(shared_act: bool, act_init: str | Sequence[float] = "relu", act: str = "poly",
                 act_range: float = 4.0) -> Callable[[], nn.Module]:
    """A function returning the activation for the next site: the same instance when ``shared_act``.

    ``act="poly"``: trainable a·x²+b·x+c started at ``act_init``; ``act="relu2"``: P3's fixed degree-2 ReLU
    approximation fitted on [-act_range, act_range] (the BatchNorm before each site keeps inputs near that range).
    """
    if act not in ACTS:
        raise PlanError(f"unknown activation {act!r}: use {' or '.join(ACTS)}")
    if act == "relu2":
        if not act_range > 0:
            raise PlanError(f"act_range must be positive, not {act_range!r}")
        make: Callable[[], nn.Module] = lambda: ReLUApprox(float(act_range))  # noqa: E731
    else:
        init = act_init if isinstance(act_init, str) else tuple(float(v) for v in act_init)
        make = lambda: PolyAct(init)  # noqa: E731
    shared = make() if shared_act else None
    return (lambda: shared) if shared is not None else make


def _dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(float(p))] if p and p > 0 else []


def _positive(name: str, value: int, arch: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{arch}: {name} must be a positive integer, not {value!r}")
    return value


def _check_size(size: int, arch: str, image_size: int) -> int:
    if size < 1:
        raise PlanError(f"{arch}: image_size {image_size} is too small for this architecture; use a larger --size")
    return size


def build_fcnn(in_channels: int = 1, num_outputs: int = 2, image_size: int = 28, hidden: int | Sequence[int] = (64,),
               dropout: float = 0.0, shared_act: bool = False, act_init: str | Sequence[float] = "relu",
               act: str = "poly", act_range: float = 4.0) -> nn.Sequential:
    """P2-style fully connected net: Flatten -> [Linear -> BN1d -> quadratic] x len(hidden) -> Linear."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    for w in widths:
        _positive("hidden width", w, "fcnn")
    act = _act_factory(shared_act, act_init, act, act_range)
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_channels * image_size * image_size
    for w in widths:
        layers += [nn.Linear(prev, w), nn.BatchNorm1d(w), act(), *_dropout(dropout)]
        prev = w
    layers.append(nn.Linear(prev, num_outputs))
    return nn.Sequential(*layers)


def build_hecnn(in_channels: int = 1, num_outputs: int = 2, image_size: int = 28, channels: int = 8,
                hidden: int = 32, kernel: int = 5, stride: int = 2, padding: int | None = None, dropout: float = 0.0,
                shared_act: bool = False, act_init: str | Sequence[float] = "relu", pool: int = 1,
                act: str = "poly", act_range: float = 4.0) -> nn.Sequential:
    """The default CKKS network: one strided conv and one hidden FC layer, each followed by BN and a quadratic.

    Two non-linear layers keep the multiplicative depth at 5 (fits N=8192 at 128-bit security, reference.md §6).
    ``pool`` > 1 average-pools the feature maps before the FC layer: fewer FC weights to fit on small datasets,
    and ``folding.fold_avgpool`` merges the pool back into the FC layer for the encrypted backends.
    """
    _positive("channels", channels, "hecnn")
    _positive("hidden", hidden, "hecnn")
    _positive("kernel", kernel, "hecnn")
    _positive("stride", stride, "hecnn")
    pad = kernel // 2 if padding is None else int(padding)
    _positive("pool", pool, "hecnn")
    side = _check_size(conv_out(image_size, kernel, stride, pad) // pool, "hecnn", image_size)
    act = _act_factory(shared_act, act_init, act, act_range)
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel, stride=stride, padding=pad),
        nn.BatchNorm2d(channels),
        act(),
        *([nn.AvgPool2d(pool)] if pool > 1 else []),
        nn.Flatten(),
        *_dropout(dropout),
        nn.Linear(channels * side * side, hidden),
        nn.BatchNorm1d(hidden),
        act(),
        *_dropout(dropout),
        nn.Linear(hidden, num_outputs),
    )


def build_lenet5_he(in_channels: int = 1, num_outputs: int = 2, image_size: int = 28, widths: Sequence[int] = (6, 16),
                    fc: Sequence[int] = (120, 84), dropout: float = 0.0, shared_act: bool = False,
                    act_init: str | Sequence[float] = "relu", act: str = "poly",
                    act_range: float = 4.0) -> nn.Sequential:
    """LeNet-5 made HE-friendly: average pooling instead of max pooling, BN + quadratic instead of tanh/ReLU."""
    c1, c2 = (int(w) for w in widths)
    act = _act_factory(shared_act, act_init, act, act_range)
    side = conv_out(image_size, 5, 1, 2) // 2
    side = _check_size(conv_out(side, 5) // 2, "lenet5-he", image_size)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, c1, 5, padding=2), nn.BatchNorm2d(c1), act(), nn.AvgPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.BatchNorm2d(c2), act(), nn.AvgPool2d(2),
        nn.Flatten(),
    ]
    prev = c2 * side * side
    for w in fc:
        layers += [nn.Linear(prev, int(w)), nn.BatchNorm1d(int(w)), act(), *_dropout(dropout)]
        prev = int(w)
    layers.append(nn.Linear(prev, num_outputs))
    return nn.Sequential(*layers)


def build_p3cnn(in_channels: int = 1, num_outputs: int = 2, image_size: int = 28,
                widths: Sequence[int] = (8, 16, 16), strides: Sequence[int] = (2, 1, 1), kernel: int = 3,
                pool: int = 2, dropout: float = 0.0, act: str = "relu2", act_range: float = 4.0,
                shared_act: bool = False, act_init: str | Sequence[float] = "relu") -> nn.Sequential:
    """P3-style CNN (Ran & Li): per block Conv -> BatchNorm -> fixed degree-2 ReLU approximation, then an
    average pool and one linear classifier.

    BatchNorm keeps each activation's input near the range its fixed polynomial was fitted on; it folds into the
    convolution, the polynomial's scale into the convolution too, and the average pool into the classifier, so
    each block costs two CKKS levels and the network ``2 * len(widths) + 1``. A strided first convolution
    (rather than pooling between blocks) keeps the number of weight diagonals, and so of encrypted-weight
    ciphertexts, down. The defaults are the shipped ``pneumoniamnist-p3`` (28x28: 8x14x14 -> 16x14x14 -> 16x14x14,
    average pool to 16x7x7, linear 784 -> outputs).
    """
    widths = [_positive("width", int(w), "p3cnn") for w in widths]
    strides = [_positive("stride", int(s), "p3cnn") for s in strides]
    if len(widths) != len(strides) or len(widths) < 3:
        raise PlanError(f"p3cnn: widths and strides need one entry per block and at least three blocks, got "
                        f"{len(widths)} widths and {len(strides)} strides")
    _positive("kernel", kernel, "p3cnn")
    _positive("pool", pool, "p3cnn")
    make = _act_factory(shared_act, act_init, act, act_range)
    layers: list[nn.Module] = []
    prev, side = in_channels, image_size
    for w, s in zip(widths, strides):
        layers += [nn.Conv2d(prev, w, kernel, stride=s, padding=kernel // 2), nn.BatchNorm2d(w), make()]
        prev, side = w, _check_size(conv_out(side, kernel, s, kernel // 2), "p3cnn", image_size)
    if pool > 1:
        layers.append(nn.AvgPool2d(pool))
        side = _check_size(side // pool, "p3cnn", image_size)
    layers += [nn.Flatten(), *_dropout(dropout), nn.Linear(prev * side * side, num_outputs)]
    return nn.Sequential(*layers)


def build_hefnet_se(in_channels: int = 1, num_outputs: int = 2, image_size: int = 28,
                    widths: Sequence[int] = (16, 32, 32), groups: int = 8, se_reduction: int = 4,
                    dropout: float = 0.0, shared_act: bool = False,
                    act_init: str | Sequence[float] = "relu", trainable_gate: bool = True) -> nn.Sequential:
    """P1's hefNet in small: per stage a grouped 3x3 conv -> BN -> quadratic -> HE squeeze-excite -> AvgPool(2).

    The first conv sees the raw image channels, so it is grouped only as far as ``in_channels`` allows.
    """
    act = _act_factory(shared_act, act_init)
    layers: list[nn.Module] = []
    prev, side = in_channels, image_size
    for w in widths:
        w = _positive("width", int(w), "hefnet-se")
        g = groups if prev % groups == 0 and w % groups == 0 else 1
        layers += [nn.Conv2d(prev, w, 3, padding=1, groups=g), nn.BatchNorm2d(w), act(),
                   HESqueezeExcite(w, reduction=se_reduction, act=act(), trainable_gate=trainable_gate),
                   nn.AvgPool2d(2)]
        prev, side = w, side // 2
        _check_size(side, "hefnet-se", image_size)
    layers += [nn.Flatten(), *_dropout(dropout), nn.Linear(prev * side * side, num_outputs)]
    return nn.Sequential(*layers)


def build_tenseal_tutorial4(in_channels: int = 1, num_outputs: int = 2, image_size: int = 28, channels: int = 4,
                            hidden: int = 64) -> nn.Sequential:
    """TenSEAL Tutorial 4's ConvNet: Conv(k7, s3, no padding) -> x² -> FC -> x² -> FC, for head-to-head benchmarks.

    The squares are fixed (not trained), exactly as in the tutorial. Defaults give Linear(256, 64) at 28x28.
    """
    side = _check_size(conv_out(image_size, 7, 3), "tenseal-tutorial4", image_size)
    sq1, sq2 = PolyAct((1.0, 0.0, 0.0)), PolyAct((1.0, 0.0, 0.0))
    for sq in (sq1, sq2):
        sq.requires_grad_(False)
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 7, stride=3),
        sq1,
        nn.Flatten(),
        nn.Linear(channels * side * side, hidden),
        sq2,
        nn.Linear(hidden, num_outputs),
    )
