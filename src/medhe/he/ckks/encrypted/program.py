"""The public program of an encrypted-weight plan: every instruction, level and scale, and not one weight value.

This is what the compute server receives next to the weight ciphertexts (``program.json`` in ENCDIR). It holds the
plan's shape (instructions, rotation steps, register layouts, the input gather map, the level and scale of each
weight ciphertext) because the server must know where to multiply what; the weight vectors themselves exist only
as ciphertexts. Loading checks every index the program uses, as ``planfile`` does for plaintext plans.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

from medhe.errors import PlanError
from medhe.he.ckks.compiler.packing import Layout
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.ckks.compiler.instructions import instr_from_dict, instr_to_dict
from medhe.he.ckks.compiler.program import Plan, PlainVec, Register

FORMAT = "medhe-ckks-encrypted-program/1"


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(arr).tobytes(), 9)).decode("ascii")


def _unb64(text: str, dtype: Any) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=dtype).copy()


def weight_kinds(plan: Plan) -> list[str]:
    """Per weight: ``scalar`` (one value in every slot), ``complex`` (first layer of a complex-packed input) or
    ``vector``: the encoding the key holder uses, which the server needs only to check the ciphertext counts."""
    kinds = []
    for p in plan.plains:
        kinds.append("scalar" if np.isscalar(p.values) else "complex" if np.iscomplexobj(p.values) else "vector")
    return kinds


def program_dict(plan: Plan) -> dict[str, Any]:
    """JSON-able program: the plan without its weight values."""
    return {
        "format": FORMAT,
        "params": plan.params.to_dict(),
        "input_shape": list(plan.input_shape),
        "input_level": plan.input_level,
        "output_register": plan.output_register,
        "output_count": plan.output_count,
        "output_bound": plan.output_bound,
        "key_levels": plan.require_key_levels(),  # of the plaintext-weight plan: its public id is the base id
        "batch": plan.batch,
        "strategies": list(plan.strategies),
        "key_paths": {str(k): v for k, v in plan.key_paths.items()},
        "instrs": [instr_to_dict(ins) for ins in plan.instrs],
        "registers": [{"level": r.level, "scale": r.scale, "period": r.layout.period,
                       "replicated": r.layout.replicated, "slots": _b64(np.asarray(r.layout.slots, dtype=np.int32))}
                      for r in plan.registers],
        "weights": [{"level": p.level, "scale": p.scale, "kind": k} for p, k in zip(plan.plains, weight_kinds(plan))],
        "gather": {"shape": list(plan.gather.shape), "data": _b64(plan.gather.astype(np.int32))},
    }


def _bad(reason: str) -> PlanError:
    return PlanError(f"the encrypted model's program is unusable ({reason}); run medhe encrypt-model again")


def load_program(doc: Any) -> tuple[Plan, list[str]]:
    """(plan whose weights are placeholders, weight kinds) from :func:`program_dict` output, fully checked."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(f"not a {FORMAT} document")
    try:
        params = CKKSParams.from_dict(doc["params"])
        slots = params.slots
        registers = []
        for r in doc["registers"]:
            s = _unb64(r["slots"], np.int32).astype(np.int64)
            if s.size and (s.min() < 0 or s.max() >= slots):
                raise ValueError("a register has slots outside the ring")
            registers.append(Register(Layout(s, int(r["period"]), bool(r["replicated"])), int(r["level"]),
                                      float(r["scale"])))
        weights = [PlainVec(None, int(w["level"]), float(w["scale"])) for w in doc["weights"]]
        kinds = [str(w["kind"]) for w in doc["weights"]]
        if any(k not in ("scalar", "vector", "complex") for k in kinds):
            raise ValueError("unknown weight kind")
        top = int(doc["input_level"])
        if any(not 0 <= w.level <= top for w in weights):
            raise ValueError("a weight lies outside the modulus chain")
        instrs = []
        for d in doc["instrs"]:
            instrs.append(instr_from_dict(d, len(weights), len(registers)))
        shape = [int(v) for v in doc["gather"]["shape"]]
        gather = _unb64(doc["gather"]["data"], np.int32).astype(np.int64)
        if len(shape) != 2 or shape[1] != slots or gather.size != shape[0] * shape[1]:
            raise ValueError("the input gather map has the wrong shape")
        out = int(doc["output_register"])
        if not 0 <= out < len(registers):
            raise ValueError("output register out of range")
        bound = doc.get("output_bound")
        plan = Plan(params, None, instrs, registers, weights, gather.reshape(shape), top, out,
                    int(doc["output_count"]), {}, [str(s) for s in doc["strategies"]],
                    tuple(int(s) for s in doc["input_shape"]),
                    {int(k): [int(x) for x in v] for k, v in doc["key_paths"].items()},
                    None if bound is None else float(bound),
                    {"galois": {str(k): int(v) for k, v in doc["key_levels"]["galois"].items()},
                     "relin": int(doc["key_levels"]["relin"])}, int(doc.get("batch", 1)))
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, zlib.error, base64.binascii.Error) as exc:
        raise _bad(f"inconsistent contents: {exc}") from None
    return plan, kinds
