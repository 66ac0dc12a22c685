"""CKKS encrypted inference on Microsoft SEAL: compiler (trace + fold + parameters + packing), client and server.

Public entry points are imported lazily so that sibling modules (serialization, benchmarks) can import the
package without pulling in the whole compiler.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile_ckks", "compile_plan", "CKKSClient", "CKKSServerModel", "layer_errors", "layer_report",
           "dump_server", "load_server", "server_from_model"]

_LAZY = {
    "compile_ckks": "medhe.he.ckks.server",
    "CKKSServerModel": "medhe.he.ckks.server",
    "compile_plan": "medhe.he.ckks.plan",
    "CKKSClient": "medhe.he.ckks.client",
    "layer_errors": "medhe.he.ckks.debug",
    "layer_report": "medhe.he.ckks.debug",
    "server_from_model": "medhe.he.ckks.server",
    "dump_server": "medhe.he.ckks.planfile",
    "load_server": "medhe.he.ckks.planfile",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medhe.he.ckks' has no attribute {name!r}")
