"""A compiled CKKS server model as bytes: compile once (seconds), load at server start (milliseconds).

Layout: ``b"MHCKPLAN" | version u8 | crc32 u32 | json length u32 | JSON | npz``. The JSON holds the program
(instructions, register levels/scales, plaintext levels/scales, key paths, task, labels); the npz holds the
numeric arrays (plaintext weight vectors, register layouts, the gather map), loaded without pickle. Loading checks
the CRC, the 128-bit floor, every index the program uses, and that the public plan still hashes to its id.
The IR graph is not stored: a loaded model evaluates, but per-layer debugging needs a fresh compile.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np

from medhe.errors import PlanError, SecurityError
from medhe.he.ckks.compiler.keybudget import key_levels_of
from medhe.he.ckks.compiler.packing import Layout
from medhe.he.ckks.compiler.params import CKKSParams
from medhe.he.ckks.compiler.instructions import instr_from_dict, instr_to_dict
from medhe.he.ckks.compiler.program import Plan, PlainVec, Register
from medhe.he.ckks.backends.base import Backend
from medhe.he.ckks.server import CKKSServerModel

MAGIC = b"MHCKPLAN"
VERSION = 1
_HEAD = struct.Struct("<8sBII")

__all__ = ["dump_server", "load_server"]


def dump_server(server: CKKSServerModel) -> bytes:
    plan = server.plan
    arrays: dict[str, np.ndarray] = {"gather": plan.gather.astype(np.int32)}
    plains = []
    vectors: list[np.ndarray] = []
    cvectors: list[np.ndarray] = []
    for p in plan.plains:
        if np.isscalar(p.values):
            plains.append({"level": p.level, "scale": p.scale, "scalar": float(p.values)})
        elif np.iscomplexobj(p.values):  # first-layer weights of a complex-packed input
            plains.append({"level": p.level, "scale": p.scale, "cvector": len(cvectors)})
            cvectors.append(np.asarray(p.values, dtype=np.complex128))
        else:
            plains.append({"level": p.level, "scale": p.scale, "vector": len(vectors)})
            vectors.append(np.asarray(p.values, dtype=np.float64))
    arrays["vectors"] = np.stack(vectors) if vectors else np.zeros((0, plan.params.slots))
    arrays["cvectors"] = np.stack(cvectors) if cvectors else np.zeros((0, plan.params.slots), dtype=np.complex128)
    registers = []
    shared: dict[int, int] = {}  # multi-block plans: the K registers of a value share one layout, stored once
    for i, r in enumerate(plan.registers):
        entry = {"level": r.level, "scale": r.scale, "period": r.layout.period,
                 "replicated": r.layout.replicated, "batch": r.layout.batch}
        if plan.multi_block:
            if id(r.layout) not in shared:
                shared[id(r.layout)] = len(shared)
                arrays[f"layout{shared[id(r.layout)]}"] = np.asarray(r.layout.slots, dtype=np.int64)
            entry.update(layout=shared[id(r.layout)], block=r.block, blocks=int(r.layout.blocks))
        else:
            arrays[f"slots{i}"] = np.asarray(r.layout.slots, dtype=np.int64)
        registers.append(entry)
    meta = {"format": VERSION, "params": plan.params.to_dict(), "input_shape": list(plan.input_shape),
            "input_level": plan.input_level, "output_register": plan.output_register,
            "output_count": plan.output_count, "node_register": {str(k): v for k, v in plan.node_register.items()},
            "strategies": plan.strategies, "key_paths": {str(k): v for k, v in plan.key_paths.items()},
            "output_bound": plan.output_bound, "key_levels": plan.require_key_levels(), "batch": plan.batch,
            "instrs": [instr_to_dict(ins) for ins in plan.instrs], "registers": registers, "plains": plains,
            "task": server.task, "labels": server.labels, "name": server.name, "plan_id": server.plan_id}
    if plan.multi_block:
        meta["node_blocks"] = {str(k): v for k, v in plan.node_blocks.items()}
        meta["choices"] = plan.choices
    text = json.dumps(meta).encode()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    body = struct.pack("<I", len(text)) + text + buf.getvalue()
    return MAGIC + struct.pack("<BI", VERSION, zlib.crc32(body)) + body


def _bad(reason: str) -> PlanError:
    return PlanError(f"compiled CKKS model is unusable ({reason}); compile the model again")


def load_server(data: bytes, backend: str | Backend | None = "auto") -> CKKSServerModel:
    """A server model from :func:`dump_server` bytes, served on ``backend``; ``PlanError`` (or ``SecurityError``)
    when they do not check out. Files written before key levels and the batch field were stored still load."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 17 or data[:8] != MAGIC:
        raise _bad("not a medhe CKKS plan file")
    version, crc = struct.unpack_from("<BI", data, 8)
    if version != VERSION:
        raise _bad(f"format {version}, this medhe reads {VERSION}")
    body = bytes(data[13:])
    if zlib.crc32(body) != crc:
        raise _bad("checksum mismatch: the file is truncated or corrupted")
    try:
        (n,) = struct.unpack_from("<I", body)
        meta = json.loads(body[4:4 + n])
        with np.load(io.BytesIO(body[4 + n:]), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        params = CKKSParams.from_dict(meta["params"])
    except SecurityError:
        raise
    except (ValueError, KeyError, TypeError, struct.error, OSError, zlib.error) as exc:
        raise _bad(f"unreadable contents: {exc}") from None
    try:
        plan = _rebuild(meta, arrays, params)
        server = CKKSServerModel(plan, task=meta["task"], labels=meta["labels"], name=meta["name"], backend=backend)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise _bad(f"inconsistent contents: {exc}") from None
    if server.plan_id != meta["plan_id"]:
        raise _bad("its public plan does not match its id")
    return server


def _rebuild(meta: dict, arrays: dict[str, np.ndarray], params: CKKSParams) -> Plan:
    slots = params.slots
    vectors, cvectors = arrays["vectors"], arrays["cvectors"]
    for v in (vectors, cvectors):
        if v.ndim != 2 or (len(v) and v.shape[1] != slots):
            raise ValueError("weight vectors have the wrong shape")
    plains = []
    for p in meta["plains"]:
        if "scalar" in p:
            values = float(p["scalar"])
        elif "cvector" in p:
            values = cvectors[int(p["cvector"])]
        else:
            values = vectors[int(p["vector"])]
        plains.append(PlainVec(values, int(p["level"]), float(p["scale"])))
    registers = []
    layouts: dict[int, Layout] = {}
    for i, r in enumerate(meta["registers"]):
        blocks = int(r.get("blocks", 1))
        s = arrays[f"layout{int(r['layout'])}"] if "layout" in r else arrays[f"slots{i}"]
        if blocks < 1 or s.size and (s.min() < 0 or s.max() >= slots * blocks):
            raise ValueError(f"register {i} has slots outside the ring")
        if "layout" in r:
            layout = layouts.setdefault(int(r["layout"]), Layout(s, int(r["period"]), bool(r["replicated"]),
                                                                 batch=int(r.get("batch", 1)), blocks=blocks))
        else:
            layout = Layout(s, int(r["period"]), bool(r["replicated"]), batch=int(r.get("batch", 1)))
        block = int(r.get("block", 0))
        if not 0 <= block < blocks:
            raise ValueError(f"register {i} names block {block} of a {blocks}-block value")
        registers.append(Register(layout, int(r["level"]), float(r["scale"]), block))
    instrs = []
    for d in meta["instrs"]:
        instrs.append(instr_from_dict(d, len(plains), len(registers)))
    gather = arrays["gather"].astype(np.int64)
    if gather.ndim != 2 or gather.shape[1] != slots:
        raise ValueError("input gather map has the wrong shape")
    out = int(meta["output_register"])
    if not 0 <= out < len(registers):
        raise ValueError("output register out of range")
    plan = Plan(params, None, instrs, registers, plains, gather, int(meta["input_level"]), out,
                int(meta["output_count"]), {int(k): int(v) for k, v in meta["node_register"].items()},
                list(meta["strategies"]), tuple(int(s) for s in meta["input_shape"]),
                {int(k): [int(x) for x in v] for k, v in meta["key_paths"].items()},
                None if meta.get("output_bound") is None else float(meta["output_bound"]),  # absent in old files
                batch=int(meta.get("batch", 1)))
    if "node_blocks" in meta:
        plan.node_blocks = {int(k): [int(x) for x in v] for k, v in meta["node_blocks"].items()}
        if any(not 0 <= x < len(registers) for v in plan.node_blocks.values() for x in v):
            raise ValueError("a value's blocks refer to missing registers")
        plan.choices = [str(c) for c in meta.get("choices", [])]
    levels = meta.get("key_levels")  # absent in old files: derive them as the compiler does
    plan.key_levels = key_levels_of(plan) if levels is None else {
        "galois": {str(int(k)): int(v) for k, v in levels["galois"].items()}, "relin": int(levels["relin"])}
    return plan
