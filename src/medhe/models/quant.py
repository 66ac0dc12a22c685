"""Quantization-aware fully connected networks whose forward pass *is* the integer program TFHE evaluates.

Why this shape: under TFHE a clear-weight matmul on encrypted integers is cheap (leveled), while every non-linear
step is a programmable bootstrap (PBS) whose cost grows steeply with the bit width of its input. So the network is
  public average pooling -> unsigned ``input_bits`` quantizer (client side, before encryption)
  -> [integer matmul + integer bias -> drop the low bits of the accumulator (rounding) -> one table lookup that
      applies scale, ReLU and the next ``act_bits`` quantizer] per hidden layer
  -> integer matmul + integer bias (output logits are dequantized by the client with one public scale).
Training sees exactly that: straight-through rounding of inputs, weights, biases, the accumulator rounding
(with the number of dropped bits derived from the *worst-case* accumulator range, so no in-range input can
overflow the circuit) and the activation quantizer. ``export_integer`` freezes it into an ``IntegerFCNN`` that
both the plain integer reference and the Concrete circuit execute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medhe.errors import ArtifactError


def ste_round(t: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (straight-through estimator)."""
    return t + (torch.round(t) - t).detach()


def ste_floor(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.floor(t) - t).detach()


def signed_bits(lo: float, hi: float) -> int:
    """Bits of a two's complement integer holding every value of [lo, hi] (at least 2)."""
    bits = 1
    while not (-(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1):
        bits += 1
    return max(bits, 2)


def accumulator_plan(lo: float, hi: float, keep_bits: int | None) -> tuple[int, int]:
    """(bit width, low bits to round away) for an accumulator in [lo, hi] that keeps ``keep_bits`` bits.

    The width also covers ``hi`` rounded *up* to the next multiple, so the rounding itself can never overflow
    (the circuit then needs no overflow-protection bootstrap).
    """
    bits = signed_bits(lo, hi)
    if keep_bits is None or bits <= int(keep_bits):
        return bits, 0
    k = bits - int(keep_bits)
    if hi + 2 ** (k - 1) > 2 ** (bits - 1) - 1:
        bits, k = bits + 1, k + 1
    return bits, k


def lsbs_to_remove(lo: float, hi: float, keep_bits: int | None) -> int:
    """How many low bits to round away so that an accumulator in [lo, hi] keeps ``keep_bits`` significant bits."""
    return accumulator_plan(lo, hi, keep_bits)[1]


def round_lsbs(acc: torch.Tensor | np.ndarray, k: int):
    """Round to a multiple of 2**k, ties up: the bit-pattern rounding Concrete's ``round_bit_pattern`` performs.

    Returns the multiple's index (acc / 2**k after rounding), so callers keep small integers.
    """
    if k == 0:
        return acc
    if isinstance(acc, (np.ndarray, np.integer, int)):
        return np.floor_divide(np.asarray(acc, dtype=np.int64) + (1 << (k - 1)), 1 << k)
    return ste_floor((acc + 2.0 ** (k - 1)) / 2.0 ** k)


class InputQuant(nn.Module):
    """Unsigned uniform quantizer with a fixed, public range: the client quantizes before it encrypts.

    The range is fixed (the preprocessing's output range, [-1, 1] for mean = std = 0.5) rather than learned so that
    an input outside it is a clear client-side error instead of a silent clip.
    """

    def __init__(self, bits: int, lo: float = -1.0, hi: float = 1.0) -> None:
        super().__init__()
        if not 1 <= int(bits) <= 8:
            raise ArtifactError(f"input_bits must be between 1 and 8, not {bits}")
        if not hi > lo:
            raise ArtifactError(f"input_range must be (lo, hi) with hi > lo, not ({lo}, {hi})")
        self.bits = int(bits)
        self.lo = float(lo)
        self.hi = float(hi)

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    @property
    def scale(self) -> float:
        return (self.hi - self.lo) / self.levels

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        # float64 so that the client's numpy quantizer (IntegerFCNN.quantize_input) lands on the same integers.
        return torch.clamp(torch.round((x.double() - self.lo) / self.scale), 0, self.levels).float()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=({self.lo}, {self.hi})"


class QLinear(nn.Linear):
    """Linear layer with symmetric per-tensor ``weight_bits`` weights (scale = max|w| / (2**(b-1) - 1)).

    Per-tensor scales keep one activation table for a whole layer; the integer bias lives at accumulator scale.
    """

    def __init__(self, in_features: int, out_features: int, weight_bits: int,
                 acc_bits: int | None = None, range_penalty: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        if not 2 <= int(weight_bits) <= 8:
            raise ArtifactError(f"weight bits must be between 2 and 8, not {weight_bits}")
        self.weight_bits = int(weight_bits)
        self.acc_bits = None if acc_bits is None else int(acc_bits)
        self.range_penalty = float(range_penalty)
        if self.range_penalty:
            self.weight.register_hook(self._penalty_grad)

    def _penalty_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Add the gradient of ``range_penalty * mean_j(sum_i |w_ji|) / (max|w| * in_features)``.

        That is the share of its worst case an accumulator can use: the rounding step before the table lookup is
        proportional to the worst case, so sparser rows keep more precision. As a gradient hook it works under
        any trainer (``medhe train`` included) without a custom loss.
        """
        w = self.weight.detach()
        scale = self.range_penalty / (w.abs().max().clamp_min(1e-8) * w.shape[0] * w.shape[1])
        return grad + scale * torch.sign(w)

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    def weight_scale(self) -> torch.Tensor:
        return self.weight.detach().abs().max().clamp_min(1e-8) / self.qmax

    def int_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.weight_scale()
        return torch.clamp(ste_round(self.weight / s), -self.qmax, self.qmax), s

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, acc_bits={self.acc_bits}"


class QReLU(nn.Module):
    """ReLU followed by an unsigned ``bits`` quantizer with a learned clip (PACT): the hidden table lookup."""

    def __init__(self, bits: int, clip_init: float = 4.0) -> None:
        super().__init__()
        if not 1 <= int(bits) <= 8:
            raise ArtifactError(f"activation bits must be between 1 and 8, not {bits}")
        self.bits = int(bits)
        self.clip = nn.Parameter(torch.tensor(float(clip_init)))

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def scale(self) -> torch.Tensor:
        return self.clip.abs().clamp_min(1e-4) / self.levels

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


@dataclass
class IntegerLayer:
    """One frozen layer: ``acc = x @ weight.T + bias`` on integers, then optional rounding and table."""

    weight: np.ndarray            # int64 (out, in)
    bias: np.ndarray              # int64 (out,)
    acc_range: tuple[int, int]    # worst case over every in-range input
    acc_bits: int                 # two's complement width that holds acc_range (and its rounding)
    lsbs: int                     # low bits rounded away before the table
    table: np.ndarray | None      # int64 table indexed by (rounded index - table_offset); None for the output layer
    table_offset: int = 0


@dataclass
class IntegerFCNN:
    """The exact integer program of a QAT model (shared by the plain reference and the TFHE circuit)."""

    pool: int
    in_shape: tuple[int, int, int]
    input_bits: int
    input_range: tuple[float, float]
    layers: list[IntegerLayer]
    output_scale: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        c, h, w = self.in_shape
        return c * (h // self.pool) * (w // self.pool)

    @property
    def input_levels(self) -> int:
        return 2 ** self.input_bits - 1

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """float (N, C, H, W) -> int64 (N, input_size): the public pooling + quantization the client performs."""
        x = np.asarray(x, dtype=np.float64)
        n, c, h, w = x.shape
        p = self.pool
        if p > 1:
            x = x[:, :, : h // p * p, : w // p * p].reshape(n, c, h // p, p, w // p, p).mean(axis=(3, 5))
        lo, hi = self.input_range
        q = np.round((x.reshape(n, -1) - lo) / ((hi - lo) / self.input_levels))
        return np.clip(q, 0, self.input_levels).astype(np.int64)

    def run(self, q: np.ndarray) -> np.ndarray:
        """Integer forward pass: int64 (N, input_size) -> int64 output accumulators (N, num_outputs)."""
        h = np.asarray(q, dtype=np.int64)
        for layer in self.layers:
            acc = h @ layer.weight.T + layer.bias
            if layer.table is None:
                return acc
            h = layer.table[round_lsbs(acc, layer.lsbs) - layer.table_offset]
        return h

    def dequantize(self, acc: np.ndarray) -> np.ndarray:
        return np.asarray(acc, dtype=np.float64) * self.output_scale

    def accumulators(self, logits: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`dequantize`: the integer output accumulators that decrypted logits stand for."""
        return np.rint(np.asarray(logits, dtype=np.float64) / self.output_scale).astype(np.int64)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.run(self.quantize_input(x)))


class QFCNN(nn.Module):
    """QAT fully connected network; ``quantized=False`` gives the same network in plain float (for comparison)."""

    def __init__(self, in_channels: int, image_size: int, num_outputs: int, hidden: Sequence[int],
                 weight_bits: Sequence[int], act_bits: Sequence[int], acc_bits: Sequence[int | None],
                 input_bits: int, pool: int, input_range: tuple[float, float], range_penalty: float = 0.0) -> None:
        super().__init__()
        self.in_shape = (int(in_channels), int(image_size), int(image_size))
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.pool_size = int(pool)
        self.flatten = nn.Flatten()
        self.input_quant = InputQuant(input_bits, *input_range)
        side = image_size // pool
        widths = [in_channels * side * side, *hidden, num_outputs]
        self.fcs = nn.ModuleList(
            QLinear(widths[i], widths[i + 1], weight_bits[i], acc_bits[i] if i < len(hidden) else None,
                    range_penalty if i < len(hidden) else 0.0)
            for i in range(len(widths) - 1))
        self.acts = nn.ModuleList(QReLU(b) for b in act_bits)
        self.quantized = True
        #: std (in accumulator units) of Gaussian noise added before rounding while training: makes the network
        #: robust to approximate rounding, whose TLU sees the accumulator plus bootstrapping noise.
        self.train_acc_noise = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            x = self.flatten(self.pool(x))
            for fc, act in zip(self.fcs, self.acts):
                x = torch.minimum(torch.relu(fc(x)), act.clip.abs())
            return self.fcs[-1](x)
        iq = self.input_quant
        x = self.flatten(self.pool(x.double()))
        h, s_in, lo_in, h_max = iq.to_int(x), iq.scale, iq.lo, iq.levels
        for i, fc in enumerate(self.fcs):
            w_int, s_w = fc.int_weight()
            s_acc = s_in * s_w
            # real input = lo + s_in * h, so W x + b = s_acc * (W_int h) + (b + lo * s_w * rowsum(W_int)).
            bias_int = ste_round((fc.bias + lo_in * s_w * w_int.sum(1)) / s_acc)
            acc = h @ w_int.t() + bias_int
            if i == len(self.acts):
                return acc * s_acc
            lo_acc, hi_acc = _worst_case(w_int.detach(), bias_int.detach(), h_max)
            k = lsbs_to_remove(lo_acc, hi_acc, fc.acc_bits)
            if self.training and self.train_acc_noise > 0 and k > 0:
                acc = acc + self.train_acc_noise * torch.randn_like(acc)
            pre = round_lsbs(acc, k) * (s_acc * 2.0 ** k)
            act = self.acts[i]
            s_h = act.scale()
            h = torch.clamp(ste_round(pre / s_h), 0, act.levels)
            s_in, lo_in, h_max = s_h, 0.0, act.levels
        raise AssertionError("unreachable")

    @torch.no_grad()
    def export_integer(self) -> IntegerFCNN:
        """Freeze the trained network into its integer program (weights, biases, rounding, tables)."""
        iq = self.input_quant
        s_in, lo_in, h_max = iq.scale, iq.lo, iq.levels
        layers: list[IntegerLayer] = []
        meta: dict[str, Any] = {"layers": []}
        for i, fc in enumerate(self.fcs):
            w_int, s_w = fc.int_weight()
            s_acc = float(s_in) * float(s_w)
            bias_int = torch.round((fc.bias + lo_in * s_w * w_int.sum(1)) / s_acc)
            lo_acc, hi_acc = _worst_case(w_int, bias_int, h_max)
            w = w_int.to(torch.int64).numpy()
            b = bias_int.to(torch.int64).numpy()
            info = {"weight_bits": fc.weight_bits, "weight_scale": float(s_w), "input_scale": float(s_in),
                    "input_zero_point": float(lo_in), "acc_range": [lo_acc, hi_acc],
                    "acc_bits": signed_bits(lo_acc, hi_acc)}
            if i == len(self.acts):
                layers.append(IntegerLayer(w, b, (lo_acc, hi_acc), signed_bits(lo_acc, hi_acc), 0, None))
                meta["layers"].append(info)
                return IntegerFCNN(self.pool_size, self.in_shape, iq.bits, (iq.lo, iq.hi), layers,
                                   output_scale=s_acc, meta=meta)
            bits, k = accumulator_plan(lo_acc, hi_acc, fc.acc_bits)
            act = self.acts[i]
            s_h = float(act.scale())
            r_lo, r_hi = int(round_lsbs(np.int64(lo_acc), k)), int(round_lsbs(np.int64(hi_acc), k))
            idx = np.arange(r_lo, r_hi + 1, dtype=np.int64)
            # float32 like the training forward, so the table reproduces the QAT model's quantizer exactly.
            pre = torch.tensor(idx, dtype=torch.float32) * torch.tensor(s_acc * 2.0 ** k, dtype=torch.float32)
            table = torch.clamp(torch.round(pre / torch.tensor(s_h, dtype=torch.float32)), 0, act.levels)
            layers.append(IntegerLayer(w, b, (lo_acc, hi_acc), bits, k, table.to(torch.int64).numpy(), r_lo))
            info.update({"lsbs_rounded": k, "tlu_input_bits": bits - k, "act_bits": act.bits,
                         "act_scale": s_h})
            meta["layers"].append(info)
            s_in, lo_in, h_max = s_h, 0.0, act.levels
        raise AssertionError("unreachable")

    def quantization_card(self) -> dict[str, Any]:
        """The card's ``quantization`` block: bit widths, scales, zero points, rounding per layer."""
        integer = self.export_integer()
        return {"scheme": "tfhe", "pool": integer.pool, "input_bits": integer.input_bits,
                "input_range": list(integer.input_range), "input_scale": self.input_quant.scale,
                "input_zero_point": self.input_quant.lo, "output_scale": integer.output_scale,
                "layers": integer.meta["layers"]}


def _worst_case(w_int: torch.Tensor, bias_int: torch.Tensor, x_max: int) -> tuple[int, int]:
    """Accumulator range over every input in [0, x_max]^n: the bound the circuit's bit widths must cover."""
    lo = (torch.clamp(w_int, max=0).sum(1) * x_max + bias_int).min()
    hi = (torch.clamp(w_int, min=0).sum(1) * x_max + bias_int).max()
    return int(lo), int(hi)


def _per_layer(value: int | Sequence[int | None] | None, n: int, what: str) -> list:
    if value is None or isinstance(value, (int, np.integer)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ArtifactError(f"{what} lists {len(value)} values but the network has {n} layers; give one per layer")
    return value


def build_qfcnn(in_channels: int = 1, num_outputs: int = 2, image_size: int = 28, hidden: int | Sequence[int] = 16,
                quant_bits: int | Sequence[int] = 3, input_bits: int = 3, act_bits: int | Sequence[int] = 3,
                acc_bits: int | Sequence[int | None] | None = 5, pool: int = 2,
                input_range: Sequence[float] = (-1.0, 1.0), range_penalty: float = 1.0, **kw: Any) -> QFCNN:
    """Build a QAT FCNN.

    ``quant_bits``: weight bits (one value, or one per linear layer); ``act_bits``: hidden activation bits (one per
    hidden layer); ``acc_bits``: significant bits kept in each hidden accumulator before its table lookup (None:
    no rounding); ``input_bits``: bits of the encrypted input; ``pool``: public average pooling factor;
    ``range_penalty``: training pressure towards small worst-case accumulators (see ``QLinear._penalty_grad``).
    """
    if kw:
        raise ArtifactError(f"qfcnn does not take {', '.join(sorted(kw))}; see build_qfcnn's arguments")
    hidden = [int(hidden)] if isinstance(hidden, (int, np.integer)) else [int(h) for h in hidden]
    if not hidden or min(hidden) < 1:
        raise ArtifactError(f"hidden must be one or more positive layer widths, not {hidden}")
    if int(pool) < 1 or image_size // int(pool) < 1:
        raise ArtifactError(f"pool must be between 1 and image_size ({image_size}), not {pool}")
    n = len(hidden)
    lo, hi = (float(v) for v in input_range)
    return QFCNN(in_channels, image_size, num_outputs, hidden, _per_layer(quant_bits, n + 1, "quant_bits"),
                 _per_layer(act_bits, n, "act_bits"), _per_layer(acc_bits, n, "acc_bits"), int(input_bits),
                 int(pool), (lo, hi), float(range_penalty))


__all__ = ["IntegerFCNN", "accumulator_plan", "IntegerLayer", "QFCNN", "build_qfcnn", "lsbs_to_remove", "round_lsbs", "signed_bits",
           "ste_round"]
