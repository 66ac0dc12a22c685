"""Scheme-independent IR: an ``nn.Sequential`` of medhe layers as a small graph of five operations.

``linear`` (a sparse matrix + bias over flattened C,H,W tensors: Conv2d with any stride/padding/groups, Linear,
AvgPool2d, BatchNorm, the squeeze-excite mean and channel broadcast), ``poly`` (an activation polynomial with the
input range it saw in training), ``mul`` (element-wise product of two values: the SE gate), ``add`` (residual) and
``input``. Once everything linear is a matrix, folding is one rule: a linear node whose only consumer is another
linear node is multiplied into it (BN into its conv, the mean into fc1, fc2 into the broadcast, ...). Other
scheme compilers (TFHE, Paillier) can reuse ``trace`` and ``run_plain`` as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from medhe.errors import PlanError
from medhe.models import layers as L


@dataclass
class Node:
    """One IR operation; its output is the value with the node's index."""

    op: str  # "input" | "linear" | "poly" | "mul" | "add"
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str = ""
    matrix: sp.csr_matrix | None = None  # linear: (out_size, in_size), float64
    pattern: sp.csr_matrix | None = None  # linear: structural non-zeros (architecture only, not weight values)
    bias: np.ndarray | None = None  # linear: (out_size,)
    stride: tuple[int, int] | None = None  # linear image->image: output pixel step measured in input pixels
    coeffs: tuple[float, ...] | None = None  # poly: lowest degree first
    input_range: tuple[float, float] | None = None  # poly: observed input range

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def consumers(self, index: int) -> list[int]:
        return [j for j, n in enumerate(self.nodes) if index in n.inputs]

    def describe(self) -> list[str]:
        out = []
        for i, n in enumerate(self.nodes):
            extra = f" nnz={n.matrix.nnz}" if n.matrix is not None else (f" coeffs={n.coeffs}" if n.coeffs else "")
            out.append(f"%{i} = {n.op}{list(n.inputs)} -> {n.shape} {n.name}{extra}")
        return out


# ---------------------------------------------------------------------------------------------------------------
# tracing


def trace(model: nn.Module, input_shape: tuple[int, ...],
          activation_ranges: dict[str, Any] | None = None, fold: bool = True, keep: Any = None) -> Graph:
    """The IR of ``model`` for inputs of ``input_shape`` (without batch axis); folded unless ``fold=False``
    (``keep``: see :func:`fold_linear`)."""
    L.check_he_friendly(model)
    graph = Graph()
    cur = graph.add(Node("input", (), tuple(int(s) for s in input_shape), name="input"))
    tracer = _Tracer(graph, activation_ranges or {})
    tracer.sequence(model, cur, "")
    return fold_linear(graph, keep) if fold else graph


class _Tracer:
    def __init__(self, graph: Graph, ranges: dict[str, Any]) -> None:
        self.graph = graph
        self.ranges = ranges

    def shape(self, index: int) -> tuple[int, ...]:
        return self.graph.nodes[index].shape

    def linear(self, src: int, matrix: sp.spmatrix, bias: np.ndarray, shape: tuple[int, ...], name: str,
               stride: tuple[int, int] | None, pattern: sp.spmatrix | None = None) -> int:
        matrix = sp.csr_matrix(matrix, dtype=np.float64)
        pattern = sp.csr_matrix(pattern if pattern is not None else (matrix != 0), dtype=bool)
        return self.graph.add(Node("linear", (src,), shape, name, matrix=matrix, pattern=pattern,
                                   bias=np.asarray(bias, dtype=np.float64).reshape(-1), stride=stride))

    def sequence(self, module: nn.Module, cur: int, prefix: str) -> int:
        for name, child in module.named_children():
            cur = self.module(child, cur, f"{prefix}{name}")
        return cur

    def module(self, mod: nn.Module, cur: int, name: str) -> int:
        shape = self.shape(cur)
        if isinstance(mod, nn.Sequential):
            return self.sequence(mod, cur, f"{name}.")
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return cur
        if isinstance(mod, nn.Flatten):
            node = self.graph.nodes[cur]
            if mod.start_dim != 1 or mod.end_dim != -1:
                raise PlanError(f"layer {name!r}: only Flatten() over all non-batch axes is supported")
            if len(shape) == 1:
                return cur
            # A reshape is free: re-label the value (same element order as torch's row-major flatten).
            if node.op == "input":
                node.shape = (int(np.prod(shape)),)
                return cur
            return self.linear(cur, sp.identity(int(np.prod(shape))), np.zeros(int(np.prod(shape))),
                               (int(np.prod(shape)),), name, None)
        if isinstance(mod, nn.Conv2d):
            return self.conv(mod, cur, name)
        if isinstance(mod, nn.AvgPool2d):
            return self.avgpool(mod, cur, name)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.batchnorm(mod, cur, name)
        if isinstance(mod, nn.Linear):
            if len(shape) != 1:
                raise PlanError(f"layer {name!r}: Linear needs a flat input, got shape {shape}; add nn.Flatten()")
            if shape[0] != mod.in_features:
                raise PlanError(f"layer {name!r}: Linear expects {mod.in_features} inputs, the model gives {shape[0]}")
            w = mod.weight.detach().double().numpy()
            b = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(mod.out_features)
            return self.linear(cur, w, b, (mod.out_features,), name, None, pattern=np.ones_like(w, dtype=bool))
        if isinstance(mod, L.RangeRecorder):
            return self.poly(mod, cur, name)
        if isinstance(mod, L.HESqueezeExcite):
            return self.squeeze_excite(mod, cur, name)
        if isinstance(mod, L.Residual):
            body = self.module(mod.body, cur, f"{name}.body")
            if self.shape(body) != shape:
                raise PlanError(f"layer {name!r}: the residual body changes the shape {shape} -> {self.shape(body)}")
            return self.graph.add(Node("add", (cur, body), shape, name))
        raise PlanError(f"layer {name!r} ({type(mod).__name__}) has no encrypted implementation")

    def poly(self, mod: L.RangeRecorder, cur: int, name: str) -> int:
        rng = self.ranges.get(name) if self.ranges else None
        if rng is None:
            rng = mod.observed_range()
        rng = (float(rng[0]), float(rng[1])) if rng is not None else None
        coeffs = tuple(float(c) for c in mod.coefficients())
        while len(coeffs) > 1 and coeffs[-1] == 0.0:
            coeffs = coeffs[:-1]
        return self.graph.add(Node("poly", (cur,), self.shape(cur), name, coeffs=coeffs, input_range=rng))

    def conv(self, mod: nn.Conv2d, cur: int, name: str) -> int:
        shape = self.shape(cur)
        if len(shape) != 3 or shape[0] != mod.in_channels:
            raise PlanError(f"layer {name!r}: Conv2d expects {mod.in_channels} channels, the model gives shape {shape}")
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise PlanError(f"layer {name!r}: only numeric zero padding is supported; set padding=<int>")
        ci_n, h, w = shape
        co_n, g = mod.out_channels, mod.groups
        kh, kw = mod.kernel_size
        sh, sw = mod.stride
        ph, pw = mod.padding
        dh, dw = mod.dilation
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise PlanError(f"layer {name!r}: the kernel does not fit the {h}x{w} input")
        weight = mod.weight.detach().double().numpy()  # (co, ci/g, kh, kw)
        cin_g, cout_g = ci_n // g, co_n // g
        oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
        oy, ox = oy.ravel(), ox.ravel()
        rows, cols, vals = [], [], []
        for co in range(co_n):
            for cl in range(cin_g):
                ci = (co // cout_g) * cin_g + cl
                for ky in range(kh):
                    iy = oy * sh - ph + ky * dh
                    for kx in range(kw):
                        ix = ox * sw - pw + kx * dw
                        ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                        rows.append(co * ho * wo + oy[ok] * wo + ox[ok])
                        cols.append(ci * h * w + iy[ok] * w + ix[ok])
                        vals.append(np.full(int(ok.sum()), weight[co, cl, ky, kx]))
        rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        size = (co_n * ho * wo, ci_n * h * w)
        matrix = sp.csr_matrix((vals, (rows, cols)), shape=size)
        pattern = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=size)
        bias = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(co_n)
        return self.linear(cur, matrix, np.repeat(bias, ho * wo), (co_n, ho, wo), name, (sh, sw), pattern)

    def avgpool(self, mod: nn.AvgPool2d, cur: int, name: str) -> int:
        shape = self.shape(cur)
        if len(shape) != 3:
            raise PlanError(f"layer {name!r}: AvgPool2d needs a (C, H, W) input, got {shape}")
        k = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size, mod.kernel_size)
        s = mod.stride if isinstance(mod.stride, tuple) else (mod.stride, mod.stride)
        c, h, w = shape
        ho, wo = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
        oc, oy, ox = np.meshgrid(np.arange(c), np.arange(ho), np.arange(wo), indexing="ij")
        oc, oy, ox = oc.ravel(), oy.ravel(), ox.ravel()
        rows, cols = [], []
        for ky in range(k[0]):
            for kx in range(k[1]):
                rows.append(oc * ho * wo + oy * wo + ox)
                cols.append(oc * h * w + (oy * s[0] + ky) * w + ox * s[1] + kx)
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        matrix = sp.csr_matrix((np.full(len(rows), 1.0 / (k[0] * k[1])), (rows, cols)), shape=(c * ho * wo, c * h * w))
        return self.linear(cur, matrix, np.zeros(c * ho * wo), (c, ho, wo), name, (s[0], s[1]))

    def batchnorm(self, mod: nn.Module, cur: int, name: str) -> int:
        shape = self.shape(cur)
        channels = shape[0]
        if channels != mod.num_features:
            raise PlanError(f"layer {name!r}: BatchNorm expects {mod.num_features} features, got shape {shape}")
        scale = (mod.weight.detach().double() if mod.affine else torch.ones(channels, dtype=torch.float64))
        shift = (mod.bias.detach().double() if mod.affine else torch.zeros(channels, dtype=torch.float64))
        inv = scale / torch.sqrt(mod.running_var.double() + mod.eps)
        shift = shift - mod.running_mean.double() * inv
        per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        diag = np.repeat(inv.numpy(), per)
        return self.linear(cur, sp.diags(diag), np.repeat(shift.numpy(), per), shape, name,
                           (1, 1) if len(shape) == 3 else None, pattern=sp.identity(len(diag), dtype=bool))

    def squeeze_excite(self, mod: L.HESqueezeExcite, cur: int, name: str) -> int:
        shape = self.shape(cur)
        if len(shape) != 3 or shape[0] != mod.channels:
            raise PlanError(f"layer {name!r}: squeeze-excite for {mod.channels} channels got shape {shape}")
        c, hw = shape[0], shape[1] * shape[2]
        mean = sp.kron(sp.identity(c), np.full((1, hw), 1.0 / hw))
        s = self.linear(cur, mean, np.zeros(c), (c,), f"{name}.mean", None)
        s = self.module(mod.fc1, s, f"{name}.fc1")
        s = self.module(mod.act, s, f"{name}.act")
        s = self.module(mod.fc2, s, f"{name}.fc2")
        expand = sp.kron(sp.identity(c), np.ones((hw, 1)))
        s = self.linear(s, expand, np.zeros(c * hw), shape, f"{name}.expand", None)
        gate = self.module(mod.gate, s, f"{name}.gate")
        return self.graph.add(Node("mul", (cur, gate), shape, name))


# ---------------------------------------------------------------------------------------------------------------
# folding


def _compose_stride(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None or b is None:
        return None
    return (a[0] * b[0], a[1] * b[1])


def fold_linear(graph: Graph, keep: Any = None) -> Graph:
    """Multiply every linear node into its single linear consumer (BN, biases, means, broadcasts fold away).

    ``keep(prev, node)``: True leaves the pair unfolded (a level spent to keep the product's diagonals few)."""
    nodes = [replace(n) for n in graph.nodes]
    alive = [True] * len(nodes)
    for j, node in enumerate(nodes):
        if node.op != "linear":
            continue
        i = node.inputs[0]
        prev = nodes[i]
        users = [k for k, n in enumerate(nodes) if alive[k] and i in n.inputs]
        if prev.op != "linear" or users != [j] or (keep is not None and keep(prev, node)):
            continue
        node.bias = node.matrix @ prev.bias + node.bias
        node.matrix = sp.csr_matrix(node.matrix @ prev.matrix)
        node.pattern = sp.csr_matrix((node.pattern.astype(np.int64) @ prev.pattern.astype(np.int64)) != 0)
        node.stride = _compose_stride(prev.stride, node.stride)
        node.name = f"{prev.name}+{node.name}"
        node.inputs = prev.inputs
        alive[i] = False
    return _compact(nodes, alive)


def keep_large_kernels(prev: Node, node: Node, sample: int = 256) -> bool:
    """Folding rule of multi-ciphertext plans: an image map into an image map (a pool into the next conv) stays
    separate when the product has more non-zeros than both factors together (its kernel grows: 2x2 pool then 3x3
    conv is a 6x6 kernel, 4x the diagonals of both). Estimated on a sample of rows."""
    if prev.stride is None or node.stride is None or len(node.shape) != 3:
        return False
    rows = node.pattern.shape[0]
    pick = np.linspace(0, rows - 1, min(rows, sample)).astype(np.int64)
    part = node.pattern[pick].astype(np.int64) @ prev.pattern.astype(np.int64)
    estimate = part.nnz * rows / len(pick)
    return estimate > prev.pattern.nnz + node.pattern.nnz


def _compact(nodes: list[Node], alive: list[bool]) -> Graph:
    remap: dict[int, int] = {}
    out = Graph()
    for i, node in enumerate(nodes):
        if alive[i]:
            remap[i] = len(out.nodes)
            out.nodes.append(replace(node, inputs=tuple(remap[k] for k in node.inputs)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# plaintext reference


def poly_eval(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    for c in reversed(coeffs):
        out = out * x + c
    return out


def run_plain(graph: Graph, x: np.ndarray) -> list[np.ndarray]:
    """Every node's value (flattened, float64) for one input: the reference the encrypted run is checked against."""
    values: list[np.ndarray] = []
    for node in graph.nodes:
        if node.op == "input":
            values.append(np.asarray(x, dtype=np.float64).reshape(-1))
        elif node.op == "linear":
            values.append(node.matrix @ values[node.inputs[0]] + node.bias)
        elif node.op == "poly":
            values.append(poly_eval(node.coeffs, values[node.inputs[0]]))
        elif node.op == "mul":
            values.append(values[node.inputs[0]] * values[node.inputs[1]])
        elif node.op == "add":
            values.append(values[node.inputs[0]] + values[node.inputs[1]])
        else:  # pragma: no cover - the tracer emits nothing else
            raise PlanError(f"unknown IR op {node.op!r}")
    return values


def output_bound(graph: Graph, input_bound: float = 1.0) -> float:
    """A bound on |output| from the recorded activation ranges (each activation's image over its range)."""
    return float(node_bounds(graph, input_bound)[-1].max())


def node_bounds(graph: Graph, input_bound: float = 1.0) -> list[np.ndarray]:
    """A bound on |value| of every element of every node.

    Linear layers use the smaller of the worst case (sum |w|) and a 4-sigma estimate (4 * sqrt(sum w^2), inputs
    of independent sign): the worst case of a wide layer is far looser than anything a trained network produces.
    """
    bounds: list[np.ndarray] = []
    for node in graph.nodes:
        if node.op == "input":
            bounds.append(np.full(node.size, float(input_bound)))
        elif node.op == "linear":
            b_in = bounds[node.inputs[0]]
            a = abs(node.matrix)
            worst = a @ b_in
            sigma = np.sqrt(a.multiply(a) @ (b_in ** 2))
            bounds.append(np.minimum(worst, 4 * sigma) + np.abs(node.bias))
        elif node.op == "poly":
            b_in = float(bounds[node.inputs[0]].max())
            lo, hi = node.input_range if is_finite_range(node.input_range) else (-b_in, b_in)
            xs = np.linspace(lo, hi, 513)
            bounds.append(np.full(node.size, float(np.abs(poly_eval(node.coeffs, xs)).max())))
        elif node.op == "mul":
            bounds.append(bounds[node.inputs[0]] * bounds[node.inputs[1]])
        else:
            bounds.append(bounds[node.inputs[0]] + bounds[node.inputs[1]])
    return bounds


def is_finite_range(r: tuple[float, float] | None) -> bool:
    return r is not None and all(math.isfinite(v) for v in r)
