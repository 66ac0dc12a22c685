"""The CKKS compiler: a torch model -> a ``Plan`` (a straight-line program with every level, scale and rotation
decided), SEAL-free.

``trace`` (scheme-independent IR + folding), ``prepare`` (polynomial factoring/linearising), ``packing`` (slot
layouts and linear lowerings), ``lower`` and ``blocklower`` (the lowerings: one ciphertext per value, several),
``driver`` (``compile_plan``: which ring, primes and lowering), ``instructions`` (the instruction set, declared
once), ``program`` (the plan's types), ``keybudget``
(key and input bytes, key paths, key levels), ``params`` (128-bit parameter choice and the prime chain). Names are
re-exported lazily, so importing one small module does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "compile_plan": "driver", "prepare_graph": "driver", "INSTRUCTIONS": "instructions", "Instr": "instructions",
    "Plan": "program", "Register": "program", "PlainVec": "program", "naf": "program",
    "decode_gather": "program",
    "CKKSParams": "params", "choose_params": "params", "params_for_ring": "params", "max_depth": "params",
    "data_primes": "params", "coeff_modulus": "params",
    "key_levels_of": "keybudget", "choose_key_paths": "keybudget", "key_bytes_as_sent": "keybudget",
    "ciphertext_bytes_as_sent": "keybudget",
    "Layout": "packing",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
