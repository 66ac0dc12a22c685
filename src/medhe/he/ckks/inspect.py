"""What a compiled CKKS plan costs, layer by layer: ``medhe inspect MODEL --scheme ckks``.

Per IR node: the operation, its layout (ciphertexts x slots, and how channels and space were blocked), key switches
(rotations; a layer's baby rotations of one input block are counted once, as the interpreter shares them),
plaintext and ciphertext products, the levels it runs between, predicted milliseconds and bytes. Predicted times
come from the planner's per-operation model (``compiler.cost``); they rank layouts and layers, benchmarks measure.
"""

from __future__ import annotations

from typing import Any

from medhe.he.ckks.compiler.keybudget import ciphertext_bytes_as_sent, key_bytes_as_sent
from medhe.he.ckks.compiler.cost import instr_cost
from medhe.he.ckks.compiler.program import Plan

def describe(plan: Plan) -> dict[str, Any]:
    """The per-layer table and totals of ``plan`` (JSON-able)."""
    n = plan.params.poly_degree
    slots = plan.params.slots
    graph = plan.graph
    layers: dict[int, dict[str, Any]] = {}
    seen: set = set()
    for ins in plan.instrs:
        row = layers.setdefault(ins.node, {"node": ins.node, "name": ins.name, "op": ins.op, "ciphertexts": 0,
                                           "rotations": 0, "products": 0, "ct_products": 0, "predicted_ms": 0.0,
                                           "plaintext_bytes": 0, "level_in": None, "level_out": None})
        out = plan.registers[ins.dst]
        src_level = plan.registers[ins.srcs[0]].level
        row["level_in"] = src_level if row["level_in"] is None else max(row["level_in"], src_level)
        row["level_out"] = out.level
        row["ciphertexts"] += 1
        layout = out.layout
        row["layout"] = {"blocks": int(layout.blocks), "slots": slots, "replicated": bool(layout.replicated)}
        rot, prods, ct_prods, ms = instr_cost(plan, ins, seen)
        row["rotations"] += rot
        row["products"] += prods
        row["ct_products"] += ct_prods
        row["predicted_ms"] += ms
        if ins.op == "linear":
            row.setdefault("_plains", set()).update(pt for _, t in ins.groups for _, _, pt in t)
        row["op"] = ins.op if row["op"] == ins.op else row["op"]
    choices = {c.split(":", 1)[0]: c.split(":", 1)[1].strip() for c in plan.choices}
    rows = []
    for node, row in sorted(layers.items()):
        if graph is not None and 0 <= node < len(graph.nodes):
            row["shape"] = list(graph.nodes[node].shape)
            row["ir_op"] = graph.nodes[node].op
        if row["name"] in choices:
            row["blocking"] = choices[row["name"]]
        row["predicted_ms"] = round(row["predicted_ms"], 1)
        distinct = row.pop("_plains", set())  # a plaintext several blocks share is encoded once
        row["plaintext_bytes"] = sum(n * (plan.plains[p].level + 1) * 8 for p in distinct)
        row["plaintexts"] = len(distinct)
        row["ciphertext_bytes"] = row["ciphertexts"] * 2 * n * (row["level_out"] + 1) * 8
        rows.append(row)
    levels = plan.require_key_levels()
    key_bytes = sum(key_bytes_as_sent(plan.params, int(lv)) for lv in levels["galois"].values())
    if levels["relin"] >= 0:
        key_bytes += key_bytes_as_sent(plan.params, int(levels["relin"]))
    from medhe.he.security import security_bits

    totals = {"rotations": sum(r["rotations"] for r in rows), "products": sum(r["products"] for r in rows),
              "ct_products": sum(r["ct_products"] for r in rows),
              "predicted_ms": round(sum(r["predicted_ms"] for r in rows), 1),
              "plaintexts": len(plan.plains),
              "plaintext_bytes": sum(r["plaintext_bytes"] for r in rows),
              "peak_live_ciphertext_bytes": _peak_live_bytes(plan),
              "input_ciphertexts": plan.input_ciphertexts,
              "input_bytes_as_sent": plan.input_ciphertexts * ciphertext_bytes_as_sent(plan.params),
              "rotation_keys": len(plan.rotation_steps), "key_bytes_as_sent": key_bytes,
              "output_bytes": 2 * n * (plan.registers[plan.output_register].level + 1) * 8}
    return {"params": {**plan.params.to_dict(), "slots": slots,
                       "security_bits": security_bits(n, list(plan.params.prime_bits))},
            "multi_block": plan.multi_block, "depth": plan.depth, "input_shape": list(plan.input_shape),
            "layers": rows, "totals": totals, "choices": list(plan.choices)}


def _peak_live_bytes(plan: Plan) -> int:
    """Largest total size of ciphertexts alive at once (registers between definition and last read)."""
    n = plan.params.poly_degree
    last: dict[int, int] = {}
    for i, ins in enumerate(plan.instrs):
        for r in ins.srcs:
            last[r] = i
    alive = {r: 2 * n * (plan.registers[r].level + 1) * 8 for r in range(plan.input_ciphertexts)}
    peak = sum(alive.values())
    for i, ins in enumerate(plan.instrs):
        alive[ins.dst] = 2 * n * (plan.registers[ins.dst].level + 1) * 8
        peak = max(peak, sum(alive.values()))
        for r in [r for r, k in last.items() if k == i]:
            alive.pop(r, None)
    return peak


def render(info: dict[str, Any]) -> str:
    """The table as text."""
    p = info["params"]
    t = info["totals"]
    lines = [f"CKKS plan: N={p['poly_degree']} ({p['slots']} slots), primes {p['prime_bits']}, "
             f"scale 2^{p['scale_bits']}, "
             f"{p['security_bits']}-bit security, depth {info['depth']}, input {tuple(info['input_shape'])}"
             + (", values over several ciphertexts" if info["multi_block"] else "")]
    head = f"{'node':>4} {'layer':<28} {'op':<7} {'shape':<14} {'cts':>4} {'rot':>6} {'pt x':>7} {'levels':>7} " \
           f"{'pred ms':>9} {'weights':>9}"
    lines += [head, "-" * len(head)]
    for r in info["layers"]:
        shape = "x".join(str(s) for s in r.get("shape", []))
        lines.append(f"{r['node']:>4} {r['name'][:28]:<28} {r['op']:<7} {shape:<14} {r['ciphertexts']:>4} "
                     f"{r['rotations']:>6} {r['products'] + r['ct_products']:>7} "
                     f"{str(r['level_in']) + '>' + str(r['level_out']):>7} {r['predicted_ms']:>9.1f} "
                     f"{_mb(r['plaintext_bytes']):>9}")
    lines.append("-" * len(head))
    lines.append(f"total: {t['rotations']} rotations, {t['products']} plaintext and {t['ct_products']} ciphertext "
                 f"products, predicted {t['predicted_ms'] / 1e3:.2f} s (SEAL, one thread), weights "
                 f"{_mb(t['plaintext_bytes'])} encoded, live ciphertexts up to {_mb(t['peak_live_ciphertext_bytes'])}")
    lines.append(f"client: {t['input_ciphertexts']} input ciphertext(s) {_mb(t['input_bytes_as_sent'])}, "
                 f"{t['rotation_keys']} rotation keys + relinearization {_mb(t['key_bytes_as_sent'])} as sent, "
                 f"result {_mb(t['output_bytes'])}")
    if p.get("alpha"):  # hybrid key switching (issue 29): digits, special primes, keys as sent
        k, alpha = int(p["specials"]), int(p["alpha"])
        data = len(p["prime_bits"]) - k
        lines.append(f"key switching: hybrid, {-(-data // alpha)} digits of {alpha} data primes, {k} special primes "
                     f"{p['prime_bits'][-k:]} (counted in the {p['security_bits']}-bit check), keys "
                     f"{_mb(t['key_bytes_as_sent'])} as sent (key envelope version 2)")
    else:
        lines.append(f"key switching: SEAL's format, {len(p['prime_bits']) - 1} digits, 1 special prime "
                     f"[{p['prime_bits'][-1]}]")
    if info["choices"]:
        lines.append("layouts chosen:")
        lines += [f"  {c}" for c in info["choices"]]
    return "\n".join(lines)


def _mb(b: int) -> str:
    return f"{b / 1e6:.1f} MB"


def inspect_model(artifact: Any, **options: Any) -> dict[str, Any]:
    """The ``inspect_model`` hook of ``medhe.he.scheme`` (``medhe inspect``): compile ``artifact``'s plan with
    ``options`` (poly_degree, key_switching, ...) and ``describe`` it; nothing is encrypted."""
    from medhe.he.ckks.compiler.driver import compile_plan
    from medhe.he.ckks.server import input_shape_of

    return describe(compile_plan(artifact.model, input_shape_of(artifact), artifact.card.get("activation_ranges"),
                                 **options))
