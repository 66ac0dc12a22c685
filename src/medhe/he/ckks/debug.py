"""Per-layer debugging: decrypt every intermediate value of one encrypted run and compare it with plaintext.

Needs the secret key, so it is a local tool (client and server in one process), never part of a deployment.
It answers "which layer loses the precision?" when a model's encrypted logits drift from the plaintext ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medhe.errors import PlanError
from medhe.he.ckks.client import CKKSClient
from medhe.he.ckks.server import CKKSServerModel
from medhe.he.ckks.compiler.trace import run_plain


def layer_errors(server: CKKSServerModel, client: CKKSClient, x: np.ndarray, keys: Any = None) -> list[dict]:
    """One row per evaluated IR node: name, op, level, max |decrypted - plaintext| and max |plaintext|."""
    plan = server.plan
    if plan.graph is None:
        raise PlanError("per-layer debugging needs a plan compiled from the model in this process, not one "
                        "loaded from bytes; compile the model again")
    keys = keys if keys is not None else server.load_keys(client.evaluation_keys())
    captured: dict[int, Any] = {}
    server.evaluate(keys, server.load_inputs(client.encrypt(x)), hook=captured.__setitem__)
    reference = run_plain(plan.graph, np.asarray(x, dtype=np.float64))
    rows = []
    for node_index, reg in sorted(plan.node_register.items()):
        if reg not in captured:
            continue  # input ciphertexts, or a gate evaluated together with its product
        slots = plan.registers[reg].layout.slots
        blocks = plan.node_blocks.get(node_index, [reg]) if plan.multi_block else [reg]
        if any(b not in captured for b in blocks):
            continue
        # a multi-block value: its blocks side by side form the global slot space its layout addresses
        got = np.concatenate([client.backend.decrypt(captured[b]) for b in blocks])[slots]
        want = reference[node_index]
        node = plan.graph.nodes[node_index]
        rows.append({"node": node_index, "name": node.name, "op": node.op, "shape": list(node.shape),
                     "level": plan.registers[reg].level, "max_abs_error": float(np.abs(got - want).max()),
                     "max_abs_value": float(np.abs(want).max())})
    return rows


def layer_report(server: CKKSServerModel, x: np.ndarray) -> list[dict]:
    """``layer_errors`` with a throwaway client (fresh keys), rows labelled for the ``evaluate --debug-layers`` table."""
    client = CKKSClient(server.spec())
    client.keygen()
    rows = layer_errors(server, client, x)
    for row in rows:
        row["layer"] = f"{row['op']} {row['name']} {tuple(row['shape'])}"
    return rows
