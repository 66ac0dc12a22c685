"""CKKS-specific preparation of the traced IR: affine activations become linear maps, and each polynomial
activation is factored so it costs the fewest ciphertext multiplications, its scale factor pushed into the linear
layer that produces its input (a·x²+b·x = sign(a)·u·(sign(a)·u + b/t) with u = t·x, t = sqrt|a|; cubics as
sign·u·((u+t·h)² + k·t²/a3)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from medhe.errors import PlanError
from medhe.he.ckks.compiler.trace import Graph, Node, fold_linear


@dataclass
class PolyForm:
    degree: int
    sign: int
    consts: dict[str, float]


def _diag_linear(src: int, node: Node, scale: float, shift: float, name: str) -> Node:
    n = node.size
    return Node("linear", (src,), node.shape, name, matrix=sp.csr_matrix(sp.identity(n) * scale),
                pattern=sp.csr_matrix(sp.identity(n, dtype=bool)), bias=np.full(n, float(shift)),
                stride=(1, 1) if len(node.shape) == 3 else None)


NEGLIGIBLE = 1e-9  # a top coefficient whose term stays below this fraction of the rest over the range is dropped


def _trim_negligible(coeffs: tuple[float, ...], input_range: tuple[float, float] | None) -> tuple[float, ...]:
    """Drop leading terms that cannot matter over the recorded range (a ~ 0 would make the factorization
    a·x·(x + b/a) divide by almost zero and amplify noise)."""
    if input_range is None:
        return coeffs
    r = max(1.0, abs(input_range[0]), abs(input_range[1]))
    while len(coeffs) > 2:
        top = abs(coeffs[-1]) * r ** (len(coeffs) - 1)
        rest = sum(abs(c) * r ** k for k, c in enumerate(coeffs[:-1]))
        if top > NEGLIGIBLE * max(rest, 1e-300):
            break
        coeffs = coeffs[:-1]
    return coeffs


def linearize_polys(graph: Graph, keep=None) -> Graph:
    """Degree <= 1 activations are affine maps: make them linear nodes and fold them into their neighbours."""
    nodes = []
    for node in graph.nodes:
        if node.op == "poly":
            node = replace(node, coeffs=_trim_negligible(tuple(node.coeffs), node.input_range))
        if node.op == "poly" and len(node.coeffs) <= 2:
            c = tuple(node.coeffs) + (0.0,) * (2 - len(node.coeffs))
            nodes.append(_diag_linear(node.inputs[0], node, c[1], c[0], node.name))
        else:
            nodes.append(node)
    return fold_linear(Graph(nodes), keep)


def factor_polys(graph: Graph) -> tuple[Graph, dict[int, PolyForm]]:
    """Put each activation's scale factor t into a linear node that feeds only it; return the factorizations."""
    nodes: list[Node] = []
    remap: dict[int, int] = {}
    forms: dict[int, PolyForm] = {}
    for i, node in enumerate(graph.nodes):
        ins = tuple(remap[k] for k in node.inputs)
        if node.op != "poly":
            nodes.append(replace(node, inputs=ins))
            remap[i] = len(nodes) - 1
            continue
        coeffs = list(node.coeffs)
        degree = len(coeffs) - 1
        if degree > 3:
            raise PlanError(f"activation {node.name!r} has degree {degree}; CKKS plans support degree 2 and 3")
        if degree == 2:
            c, b, a = coeffs
            t = math.sqrt(abs(a))
            form = PolyForm(2, 1 if a > 0 else -1, {"beta": b / t, "c": c})
        else:
            a0, a1, a2, a3 = coeffs
            t = abs(a3) ** (1.0 / 3.0)
            h = a2 / (2 * a3)
            k = a1 - a2 * a2 / (4 * a3)
            form = PolyForm(3, 1 if a3 > 0 else -1, {"th": t * h, "kz": k * t * t / a3, "c": a0})
        src = ins[0]
        prev = nodes[src]
        if prev.op == "linear" and graph.consumers(node.inputs[0]) == [i] and prev.inputs:
            nodes[src] = replace(prev, matrix=sp.csr_matrix(prev.matrix * t), bias=prev.bias * t)
        else:
            nodes.append(_diag_linear(src, node, t, 0.0, f"{node.name}.scale"))
            src = len(nodes) - 1
        # The node now reads u = t*x: rewrite it as p(u / t) so the prepared graph still computes the model.
        nodes.append(replace(node, inputs=(src,), coeffs=tuple(c / t ** k for k, c in enumerate(coeffs)),
                             input_range=None if node.input_range is None else
                             (node.input_range[0] * t, node.input_range[1] * t)))
        remap[i] = len(nodes) - 1
        forms[remap[i]] = form
    return Graph(nodes), forms
