"""The HE-friendly layer set: only operations that every encrypted backend can evaluate.

Linear maps (``nn.Conv2d`` with any stride/padding/groups, ``nn.Linear``, ``nn.AvgPool2d``, ``nn.Flatten``,
``nn.BatchNorm1d/2d`` which compile away by folding) come straight from torch. The modules here add the
non-linear parts that stay polynomial, so that CKKS evaluates them exactly and TFHE turns them into table lookups:
trainable quadratics, a fixed ReLU approximation, a cubic sigmoid gate, the squeeze-and-excitation block of P1
and the residual add. Every activation records the range of inputs it saw: CKKS parameter selection and TFHE
quantization both need it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

#: torch layer types that the compilers accept as-is (linear, or folded away).
LINEAR_TYPES = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity,
                nn.Dropout)  # Dropout is the identity at inference


class RangeRecorder(nn.Module):
    """Base for activations: tracks the min/max input seen while ``recording`` (on during training)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_min", torch.tensor(math.inf))
        self.register_buffer("input_max", torch.tensor(-math.inf))
        self.recording = True

    def reset_range(self) -> None:
        self.input_min.fill_(math.inf)
        self.input_max.fill_(-math.inf)

    def _record(self, x: torch.Tensor) -> None:
        if self.recording and x.numel():
            with torch.no_grad():
                self.input_min.copy_(torch.minimum(self.input_min, x.detach().min()))
                self.input_max.copy_(torch.maximum(self.input_max, x.detach().max()))

    def observed_range(self) -> tuple[float, float] | None:
        lo, hi = float(self.input_min), float(self.input_max)
        return None if not (math.isfinite(lo) and math.isfinite(hi)) else (lo, hi)

    def coefficients(self) -> list[float]:
        """Polynomial coefficients, lowest degree first: f(x) = sum c[k] x**k."""
        raise NotImplementedError


class PolyAct(RangeRecorder):
    """Trainable a·x² + b·x + c (AESPA/P1 style). One instance may be shared by several sites.

    ``init``: ``"identity"`` (0, 1, 0), ``"zeros"`` (P1's all-zero start), ``"relu"`` (least-squares fit of ReLU
    on ``[-init_range, init_range]``), or an explicit ``(a, b, c)`` tuple.
    """

    def __init__(self, init: str | tuple[float, float, float] = "relu", init_range: float = 4.0) -> None:
        super().__init__()
        if isinstance(init, str):
            if init == "identity":
                a, b, c = 0.0, 1.0, 0.0
            elif init == "zeros":
                a, b, c = 0.0, 0.0, 0.0
            elif init == "relu":
                a, b, c = fit_relu_quadratic(init_range)
            else:
                raise ValueError(f"unknown PolyAct init {init!r}: use identity, zeros, relu or (a, b, c)")
        else:
            a, b, c = (float(v) for v in init)
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._record(x)
        return (self.a * x + self.b) * x + self.c

    def coefficients(self) -> list[float]:
        return [float(self.c.detach()), float(self.b.detach()), float(self.a.detach())]

    def extra_repr(self) -> str:
        return f"a={float(self.a.detach()):.4g}, b={float(self.b.detach()):.4g}, c={float(self.c.detach()):.4g}"


def fit_relu_quadratic(input_range: float, samples: int = 2001) -> tuple[float, float, float]:
    """Least-squares degree-2 fit of ReLU on ``[-input_range, input_range]`` (uniform weight); returns (a, b, c)."""
    xs = np.linspace(-input_range, input_range, samples)
    c2, c1, c0 = np.polyfit(xs, np.maximum(xs, 0.0), 2)
    return float(c2), float(c1), float(c0)


class ReLUApprox(RangeRecorder):
    """Fixed (not trainable) degree-2 ReLU approximation fitted on a stated input range (P3)."""

    def __init__(self, input_range: float = 4.0) -> None:
        super().__init__()
        self.input_range = float(input_range)
        a, b, c = fit_relu_quadratic(self.input_range)
        self.register_buffer("coef", torch.tensor([c, b, a], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._record(x)
        c, b, a = self.coef
        return (a * x + b) * x + c

    def coefficients(self) -> list[float]:
        return [float(v) for v in self.coef]

    def extra_repr(self) -> str:
        return f"input_range={self.input_range}"


class CubicSigmoid(RangeRecorder):
    """a·x³ + b·x + c approximation of the sigmoid gate in P1's HE squeeze-and-excitation.

    Trainable by default (P1 init a=-1e-5, b=0.12, c=0.5); ``trainable=False`` uses the fixed
    -0.0010833·x³ + 0.12·x + 0.5 fit.
    """

    FIXED = (-0.0010833, 0.12, 0.5)
    TRAINABLE_INIT = (-1e-5, 0.12, 0.5)

    def __init__(self, trainable: bool = True) -> None:
        super().__init__()
        self.trainable = bool(trainable)
        a, b, c = self.TRAINABLE_INIT if trainable else self.FIXED
        if trainable:
            self.a = nn.Parameter(torch.tensor(a))
            self.b = nn.Parameter(torch.tensor(b))
            self.c = nn.Parameter(torch.tensor(c))
        else:
            self.register_buffer("a", torch.tensor(a))
            self.register_buffer("b", torch.tensor(b))
            self.register_buffer("c", torch.tensor(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._record(x)
        return (self.a * x * x + self.b) * x + self.c

    def coefficients(self) -> list[float]:
        return [float(self.c.detach()), float(self.b.detach()), 0.0, float(self.a.detach())]

    def extra_repr(self) -> str:
        return f"trainable={self.trainable}"


class HESqueezeExcite(nn.Module):
    """P1's squeeze-and-excitation adapted to HE.

    global average pool -> Linear(C, C/r) -> quadratic -> Linear(C/r, C) -> cubic sigmoid -> x * gate.
    The final product is ciphertext x ciphertext under CKKS.
    """

    def __init__(self, channels: int, reduction: int = 16, act: nn.Module | None = None,
                 trainable_gate: bool = True) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.fc1 = nn.Linear(channels, hidden)
        self.act = act if act is not None else PolyAct("relu")
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = CubicSigmoid(trainable=trainable_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        g = self.gate(self.fc2(self.act(self.fc1(s))))
        return x * g[:, :, None, None]


class Residual(nn.Module):
    """x + body(x): the residual add (body must keep the shape)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


ACTIVATION_TYPES = (PolyAct, ReLUApprox, CubicSigmoid)
SUPPORTED_TYPES = LINEAR_TYPES + ACTIVATION_TYPES + (HESqueezeExcite, Residual, nn.Sequential)


def activation_sites(model: nn.Module) -> dict[str, RangeRecorder]:
    """Every activation module by qualified name (a shared instance appears under its first name only)."""
    seen: dict[int, str] = {}
    out: dict[str, RangeRecorder] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, RangeRecorder) and id(mod) not in seen:
            seen[id(mod)] = name
            out[name] = mod
    return out


def activation_ranges(model: nn.Module) -> dict[str, list[float] | None]:
    """Observed input range per activation site, JSON-ready (for the model card)."""
    return {name: (list(r) if (r := mod.observed_range()) else None)
            for name, mod in activation_sites(model).items()}


def set_recording(model: nn.Module, on: bool) -> None:
    for mod in activation_sites(model).values():
        mod.recording = on


def reset_ranges(model: nn.Module) -> None:
    for mod in activation_sites(model).values():
        mod.reset_range()


def check_he_friendly(model: nn.Module) -> None:
    """Raise ``PlanError`` naming the first module outside the HE-friendly set."""
    from medhe.errors import PlanError

    for name, mod in model.named_modules():
        if name == "":
            if not isinstance(mod, nn.Sequential):
                raise PlanError("this network is not a plain stack of HE-friendly layers, which CKKS needs (a "
                               "quantization-aware *-qfcnn model runs under --scheme tfhe); pick a CKKS model such "
                               "as pneumoniamnist")
            continue
        if not isinstance(mod, SUPPORTED_TYPES):
            raise PlanError(
                f"layer {name!r} is {type(mod).__name__}, which has no encrypted implementation; "
                "use Conv2d, Linear, AvgPool2d, BatchNorm, Flatten, PolyAct, ReLUApprox, CubicSigmoid, "
                "HESqueezeExcite or Residual")
        if isinstance(mod, nn.AvgPool2d) and (mod.ceil_mode or mod.padding not in (0, (0, 0))):
            raise PlanError(f"layer {name!r}: AvgPool2d must use padding=0 and ceil_mode=False")
