"""Compiler accounting for encrypted-weight plans: key levels, bytes, operation counts, the public spec.

An encrypted-weight plan runs the plaintext-weight plan's instruction stream with every weight operand a
ciphertext (see ``WeightCiphertexts``), so it needs no new compilation: the depth is the same (a ciphertext x
ciphertext product followed by one rescale consumes one level, exactly like a plaintext product), the rotations
are the same, and each weight is encrypted at the level and scale the compiler already chose for its plaintext,
i.e. as small as it can be. What changes, and what this module accounts for:

- relinearization: one per giant-step group of every linear layer (products accumulate as size-3 ciphertexts
  first), so the relinearization key is needed up to the first layer's level and is larger;
- bytes: one seeded ciphertext per weight vector, bias, BN shift and activation constant, at its level;
- the spec: its plan id also covers the key id of the key set the weights are encrypted under.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from medhe.he.ckks.compiler.program import Plan

SPEC_FORMAT = "medhe-ckks-spec/1"
ENCRYPTED_FORMAT = "medhe-ckks-encrypted-model/1"


class WeightCiphertexts(list):
    """The plan's weights as ciphertext handles: ``run_program`` multiplies and adds them as ciphertexts."""

    encrypted = True


def weight_bytes_as_sent(params: Any, level: int) -> int:
    """One seeded weight ciphertext on the wire at ``level``: one bit-packed polynomial over primes 0..level."""
    return params.poly_degree * sum(params.prime_bits[: int(level) + 1]) // 8


def encrypted_weight_bytes(plan: Plan) -> int:
    return sum(weight_bytes_as_sent(plan.params, p.level) for p in plan.plains)


def _zero_weights(plan: Plan, sim_cls: Any) -> tuple[Any, list, WeightCiphertexts]:
    from medhe.he.ckks.compiler.params import data_primes
    from medhe.he.ckks.simulate import SimText

    sim = sim_cls(plan.params.slots, plan.input_level, data_primes(plan.params))
    zeros = np.zeros(plan.params.slots)
    inputs = [SimText(zeros.copy(), plan.input_level, plan.input_scale) for _ in range(plan.input_ciphertexts)]
    weights = WeightCiphertexts(SimText(zeros.copy(), p.level, p.scale) for p in plan.plains)
    return sim, inputs, weights


def encrypted_key_levels(plan: Plan) -> dict[str, Any]:
    """``Plan.key_levels`` for the encrypted-weight program, found by running its instruction stream."""
    from medhe.he.ckks.compiler.keybudget import _KeyLevelRecorder
    from medhe.he.ckks.runtime import run_program

    rec, inputs, weights = _zero_weights(plan, _KeyLevelRecorder)
    run_program(plan, rec, weights, inputs)
    return {"galois": {str(s): int(rec.galois.get(s, plan.input_level)) for s in plan.rotation_steps},
            "relin": int(rec.relin)}


def simulate_encrypted(plan: Plan, x: np.ndarray) -> np.ndarray:
    """The encrypted-weight program on plaintext slots (checks levels, scales and relinearization placement)."""
    from medhe.he.ckks.runtime import run_program
    from medhe.he.ckks.simulate import SimText, SlotSimulator

    sim, _, _ = _zero_weights(plan, SlotSimulator)
    flat = np.append(np.asarray(x, dtype=np.float64).reshape(-1), 0.0)
    rows = flat[plan.gather]
    if plan.input_complex:
        rows = rows[0::2] + 1j * rows[1::2]
    inputs = [sim.encrypt(sim.encode(row, plan.input_level, plan.input_scale)) for row in rows]
    weights = WeightCiphertexts(SimText(sim.encode(p.values, p.level, p.scale).values, p.level, p.scale)
                                for p in plan.plains)
    out = run_program(plan, sim, weights, inputs)
    return np.real(out.values[plan.registers[plan.output_register].layout.slots[: plan.output_count]])


def operation_counts(plan: Plan) -> dict[str, int]:
    """Ciphertext x ciphertext products and relinearizations the encrypted weights add to the plan."""
    products = relins = 0
    for ins in plan.instrs:
        if ins.op == "linear":
            products += sum(len(t) for _, t in ins.groups)
            relins += len(ins.groups)
        elif ins.op == "gate3" and "c" in ins.consts:
            products += 1
            relins += 1
    return {"weight_products": products, "weight_relinearizations": relins}


def accounting(plan: Plan) -> dict[str, Any]:
    """What the report and the spec say about the encrypted weights."""
    by_level: dict[str, int] = {}
    for p in plan.plains:
        by_level[str(p.level)] = by_level.get(str(p.level), 0) + 1
    return {"weight_ciphertexts": len(plan.plains), "weights_by_level": by_level,
            "bytes": encrypted_weight_bytes(plan), "depth": plan.depth, **operation_counts(plan)}


def _plan_id(spec: dict[str, Any]) -> str:
    body = {k: v for k, v in spec.items() if k != "plan_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def encrypted_spec(plan: Plan, task: str, labels: list[str], name: str) -> dict[str, Any]:
    """The public spec of ``plan`` run on encrypted weights, before a key set is bound to it (``bind_key``)."""
    pub = plan.public()
    base_plan_id = pub.pop("plan_id")
    pub["relinearization"] = True
    pub["key_levels"] = encrypted_key_levels(plan)
    pub["encrypted_model"] = {"format": ENCRYPTED_FORMAT, "base_plan_id": base_plan_id, "key_id": None,
                              "activation_coefficients": "encrypted", **accounting(plan)}
    return {"scheme": "ckks", "format": SPEC_FORMAT, "model": name, "task": task, "labels": list(labels), **pub}


def bind_key(spec: dict[str, Any], key_id: str) -> dict[str, Any]:
    """The spec with its key set's id, and a plan id that covers it (so keys of another set are refused)."""
    out = json.loads(json.dumps(spec))
    out["encrypted_model"]["key_id"] = str(key_id)
    out["plan_id"] = _plan_id(out)
    return out


def check_plan_id(spec: dict[str, Any]) -> bool:
    return spec.get("plan_id") == _plan_id(spec)
