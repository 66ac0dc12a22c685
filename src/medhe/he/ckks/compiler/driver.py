"""The CKKS compiler's driver: a torch model -> a Plan, every level and scale decided.

Steps: (1) turn degree-1 activations into linear maps and fold; (2) factor each activation so it costs the fewest
ciphertext multiplications, pushing its scale factor into the producing linear layer
(a·x²+b·x = sign(a)·u·(sign(a)·u + b/t) with u = t·x, t = sqrt|a|; cubics as sign·u·((u+t·h)² + k·t²/a3));
(3) lay every value out in slots and lower each linear node with the cheapest strategy (``packing``); (4) pick the
smallest secure CKKS parameters for the resulting depth and value range, then lower again with the real primes so
each plaintext is encoded at the exact scale that keeps every ciphertext at scale 2^scale_bits after a linear layer.

The plan's public part (``Plan.public()``) is what the client needs: parameters, the input gather map, rotation
steps, output slots. The private part is the plaintext weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medhe.errors import PlanError
from medhe.he.ckks.compiler import packing
from medhe.he.ckks.compiler.blocklower import BlockLowering
from medhe.he.ckks.compiler.cost import plan_ms
from medhe.he.ckks.compiler.keybudget import (INPUT_BUDGET_BYTES, KEY_BUDGET_BYTES, choose_key_paths,
                                              ciphertext_bytes_as_sent, key_bytes_as_sent, key_levels_of)
from medhe.he.ckks.compiler.lower import _Lowering, _TooDeep, _TooWide
from medhe.he.ckks.compiler.params import (PRESETS, choose_params, data_primes, max_depth, output_scale_bits,
                                           params_for_ring)
from medhe.he.ckks.compiler.prepare import PolyForm, factor_polys, linearize_polys
from medhe.he.ckks.compiler.program import Plan
from medhe.he.ckks.compiler.trace import Graph, keep_large_kernels, trace
from medhe.he.ckks.compiler.trace import output_bound as estimate_output_bound


def prepare_graph(model: nn.Module, input_shape: tuple[int, ...],
                  activation_ranges: dict[str, Any] | None = None,
                  multi_block: bool = False) -> tuple[Graph, dict[int, PolyForm]]:
    keep = keep_large_kernels if multi_block else None
    graph = linearize_polys(trace(model, input_shape, activation_ranges, keep=keep), keep)
    if len(graph.nodes) < 2:
        raise PlanError("the model has no layers to evaluate")
    return factor_polys(graph)


def _fake_primes(depth: int, scale_bits: int) -> list[int]:
    base = 2 ** scale_bits
    return [2 ** 40] + [base - (2 ** 14) * (k + 1) + 1 for k in range(depth)]


def compile_plan(model: nn.Module, input_shape: tuple[int, ...], activation_ranges: dict[str, Any] | None = None,
                 *, poly_degree: int | None = None, scale_bits: int | None = None,
                 prime_bits: list[int] | None = None,
                 output_bound: float | None = None, input_bound: float = 1.0, max_key_bytes: int = KEY_BUDGET_BYTES,
                 max_input_bytes: int = INPUT_BUDGET_BYTES, clean_output: bool = True,
                 key_switching: str = "seal", **unknown: Any) -> Plan:
    """Compile a torch ``nn.Sequential`` of medhe layers into a CKKS plan for inputs of ``input_shape``.

    Options: ``poly_degree``/``scale_bits``/``prime_bits`` force parameters (still 128-bit checked),
    ``output_bound`` the largest |logit| expected
    (default: estimated from the activation ranges), ``input_bound`` the largest |input| (1 for medhe's
    normalisation), ``max_key_bytes`` the evaluation-key budget, ``max_input_bytes`` the encrypted-input budget
    (beyond it the first layer is not laid out by the client), ``clean_output`` (default on) a final linear layer
    whose result holds nothing but copies of the logits in every slot (see ``_Lowering.lower_linear``),
    ``key_switching`` "seal" (SEAL's key format) or "hybrid" (few digits and several special primes, chosen by
    ``hybrid.planner`` from predicted time and keys' size within ``max_key_bytes``; native runtime only).
    """
    if unknown:
        raise PlanError(f"unknown CKKS option(s) {', '.join(sorted(unknown))}: use poly_degree, scale_bits, "
                        "prime_bits, max_key_bytes, max_input_bytes, output_bound, input_bound, clean_output or "
                        "key_switching")
    if key_switching not in ("seal", "hybrid"):
        raise PlanError(f"key_switching must be 'seal' or 'hybrid', not {key_switching!r}")
    degrees = [int(poly_degree)] if poly_degree else sorted(PRESETS)
    opts = dict(poly_degree=poly_degree, scale_bits=scale_bits, prime_bits=prime_bits, max_key_bytes=max_key_bytes,
                max_input_bytes=max_input_bytes, clean_output=clean_output, key_switching=key_switching)
    plan = needed = None
    if _may_fit_one_ciphertext(model, tuple(input_shape), activation_ranges, max(degrees) // 2):
        graph, forms = prepare_graph(model, tuple(input_shape), activation_ranges)
        max_abs = output_bound if output_bound is not None else estimate_output_bound(graph, input_bound)
        plan, needed = _compile_rings(graph, forms, max_abs, degrees, None, **opts)
    if plan is None and needed is None:
        # No ring holds the largest value in one ciphertext: values span several (``blocklower``). Pools stay
        # separate from the convs after them there (see ``keep_large_kernels``).
        graph, forms = prepare_graph(model, tuple(input_shape), activation_ranges, multi_block=True)
        max_abs = output_bound if output_bound is not None else estimate_output_bound(graph, input_bound)
        plan, needed = _compile_rings(graph, forms, max_abs, degrees, BlockLowering, **opts)
    if plan is not None:
        return plan
    if needed is None:
        raise PlanError(f"the model's values (largest {max(n.size for n in graph.nodes)} elements) do not fit the "
                        f"slots of any secure CKKS ring (at most {max(PRESETS) // 2}); use smaller images")
    biggest = max(degrees)
    raise PlanError(f"the model needs multiplicative depth {needed} but the largest secure CKKS parameters "
                    f"(N={biggest}, 128-bit) allow depth {max_depth(biggest)}; use fewer activation layers "
                    "or a smaller model")


def _compile_rings(graph: Graph, forms: dict[int, PolyForm], max_abs: float, degrees: list[int], cls: Any, *,
                   poly_degree: int | None, scale_bits: int | None, prime_bits: list[int] | None,
                   max_key_bytes: int, max_input_bytes: int, clean_output: bool,
                   key_switching: str = "seal") -> tuple[Plan | None, int | None]:
    """The plan on the smallest ring that fits (``cls``: the lowering, None for one ciphertext per value), or
    (None, depth needed) / (None, None) when no ring holds the values."""
    needed = None
    candidates: list[tuple[float, int, int, Plan, int]] = []
    too_big = ""
    skipped: list[str] = []
    bound = _depth_lower_bound(graph, forms) if cls is not None else 0
    for n in degrees:
        slots = n // 2
        if poly_degree is None and prime_bits is None and bound > max_depth(n):
            needed = bound
            continue  # a block lowering at this ring would only show that it is too shallow (tens of seconds)
        sb = scale_bits or PRESETS.get(n, (28, 0))[0]
        probe_depth = 64
        try:
            probe = _lower(graph, forms, slots, _fake_primes(probe_depth, sb), float(2 ** sb), probe_depth,
                           None, clean_output=clean_output, cls=cls)
        except _TooWide:
            continue
        needed = probe_depth - min(r.level for r in probe.registers)
        if prime_bits is not None or poly_degree is not None:
            params = choose_params(needed, max_abs, poly_degree=n, scale_bits=scale_bits, prime_bits=prime_bits)
        else:
            params = params_for_ring(n, needed, max_abs, scale_bits)
            if params is None:
                continue
        primes = data_primes(params)
        top = len(primes) - 1
        # im2col inputs cost one ciphertext per group of taps; past the byte budget the client sends the input
        # once instead and the first layer is evaluated with rotations like any other (same depth either way).
        n_ct = len([r for r in probe.registers if r.level == probe_depth])
        pack = n_ct * ciphertext_bytes_as_sent(params) > max_input_bytes and n_ct > 1
        if cls is not None and len(probe.gather) * ciphertext_bytes_as_sent(params) > max_input_bytes:
            too_big = (f"the packed input needs {len(probe.gather)} ciphertexts "
                       f"({len(probe.gather) * ciphertext_bytes_as_sent(params) / 1e6:.1f} MB at N={n}), over the "
                       f"input budget of {max_input_bytes / 1e6:.1f} MB: raise max_input_bytes or use smaller images")
            skipped.append(f"N={n} input {len(probe.gather) * ciphertext_bytes_as_sent(params) / 1e6:.1f} MB over "
                           "the input budget")
            continue
        plan_low = _lower(graph, forms, slots, primes, params.scale, top,
                          float(2 ** output_scale_bits(params, max_abs)), pack, clean_output, cls=cls)
        out_reg = plan_low.node_reg[len(graph.nodes) - 1]
        plan = Plan(params, graph, plan_low.instrs, plan_low.registers, plan_low.plains, plan_low.gather,
                    top, out_reg, graph.nodes[-1].size, plan_low.node_reg, plan_low.strategies,
                    tuple(graph.input_shape))
        if cls is not None:
            plan.node_blocks = plan_low.node_blocks
            plan.choices = plan_low.choices
        levels = key_levels_of(plan)  # with one key per step; keys are sent trimmed to these levels
        if key_switching == "hybrid":  # same data primes, so the lowering above stands; new special primes
            from medhe.he.ckks.hybrid.planner import choose as choose_hybrid

            hybrid = choose_hybrid(params, levels, max_key_bytes)
            params = plan.params = hybrid.params
            plan.choices = list(plan.choices) + [hybrid.describe()]
        per_key = {int(s): key_bytes_as_sent(params, lv) for s, lv in levels["galois"].items()}
        fixed = per_key.pop(0, 0) + (key_bytes_as_sent(params, levels["relin"]) if levels["relin"] >= 0 else 0)
        plan.key_paths = choose_key_paths(plan.rotation_usage(), slots, per_key, max_key_bytes - fixed)
        plan.output_bound = float(max_abs)
        plan.key_levels = key_levels_of(plan)  # once, with the final key paths
        if key_switching == "hybrid":  # the planner priced one key per step; say what is sent after the key paths
            final = sum(key_bytes_as_sent(params, lv) for lv in plan.key_levels["galois"].values())
            final += key_bytes_as_sent(params, plan.key_levels["relin"]) if plan.key_levels["relin"] >= 0 else 0
            plan.choices[-1] += (f"; {len(plan.rotation_steps)} rotation keys, {final / 1e6:.1f} MB as sent "
                                 f"(one key per step: {hybrid.key_bytes / 1e6:.1f} MB)")
        if cls is None:
            return plan, needed
        # Multi-block plans: every ring deep enough is a candidate; the cheapest predicted one wins.
        sent = sum(key_bytes_as_sent(params, lv) for lv in plan.key_levels["galois"].values())
        sent += key_bytes_as_sent(params, plan.key_levels["relin"]) if plan.key_levels["relin"] >= 0 else 0
        candidates.append((plan_ms(plan), sent, n, plan, needed))
        if poly_degree is not None or prime_bits is not None:
            break
    if not candidates:
        if too_big and needed is not None:
            raise PlanError(too_big)
        return None, needed
    ms, sent, n, plan, needed = min(candidates, key=lambda c: (c[0], c[1]))
    others = "; ".join([f"N={c[2]} {c[0] / 1e3:.1f} s, keys {c[1] / 1e6:.0f} MB" for c in candidates
                        if c[3] is not plan] + skipped)
    plan.choices.append(f"ring N={n} (depth {needed}): predicted {ms / 1e3:.1f} s; {len(plan.rotation_steps)} keys, "
                        f"{sent / 1e6:.1f} MB as sent "
                        + (f"(budget {max_key_bytes / 1e6:.0f} MB: rotations composed from fewer keys)"
                           if plan.key_paths else f"(within the {max_key_bytes / 1e6:.0f} MB budget)")
                        + (", over budget even so" if sent > max_key_bytes else "")
                        + (f" (rejected: {others})" if others else ""))
    return plan, needed


def _may_fit_one_ciphertext(model: nn.Module, input_shape: tuple[int, ...], activation_ranges: Any,
                            slots: int) -> bool:
    """False when an activation's (or a product's) input is larger than ``slots``: such a value survives every
    folding, so no one-ciphertext plan exists, and folding that graph (a pool into a 3x3 conv at 256 px makes
    tens of millions of products) would only cost memory."""
    graph = trace(model, input_shape, activation_ranges, fold=False)
    return all(packing.next_pow2(n.size) <= slots for n in graph.nodes if n.op in ("poly", "mul", "add"))


def _depth_lower_bound(graph: Graph, forms: dict[int, PolyForm]) -> int:
    """Levels the longest path of the graph needs at least (linear 1, square 1, cubic 2, product 1, a cubic gate
    and its product 2; rescalings to match a residual's operands not counted)."""
    depth = [0] * len(graph.nodes)
    gates = {n.inputs[1] for n in graph.nodes if n.op == "mul"}
    for i, node in enumerate(graph.nodes):
        ins = [depth[k] for k in node.inputs]
        if node.op == "linear":
            depth[i] = ins[0] + 1
        elif node.op == "poly":
            cubic = forms[i].degree == 3 if i in forms else len(node.coeffs) > 3
            depth[i] = ins[0] + (0 if cubic and i in gates else 2 if cubic else 1)
        elif node.op == "mul":
            gate = graph.nodes[node.inputs[1]]
            depth[i] = max(ins) + (2 if gate.op == "poly" and len(gate.coeffs) > 3 else 1)
        elif node.op == "add":
            depth[i] = max(ins)
    return max(depth)


def _lower(graph: Graph, forms: dict[int, PolyForm], slots: int, primes: list[int], scale: float, top: int,
           output_scale: float | None, pack_input: bool = False, clean_output: bool = True,
           cls: Any = None) -> _Lowering:
    low = (cls or _Lowering)(graph, forms, slots, primes, scale, top)
    low.output_scale = output_scale or scale
    low.pack_only = pack_input
    low.clean_output = clean_output
    try:
        low.run()
    except _TooDeep:
        raise PlanError("internal: the plan ran out of levels while lowering; report this model") from None
    return low
