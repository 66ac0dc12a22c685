"""Backends that run a compiled CKKS program: a name -> implementation registry.

``seal`` goes through seal-python; ``native`` is medhe's own runtime (module ``backends.native``, class
``NativeBackend``), which raises ``ImportError`` at import when its C++ extension is not built. ``auto`` takes
``native`` when it imports and otherwise ``seal``, saying once (a ``logging`` warning) that the native runtime is
not built. Modules are imported by name on first use, so a missing extension never breaks ``import medhe``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from medhe.errors import PlanError

if TYPE_CHECKING:
    from medhe.he.ckks.backends.base import Backend
    from medhe.he.ckks.compiler.params import CKKSParams

#: registry name -> (module, class)
BACKENDS = {"seal": ("medhe.he.ckks.backends.seal", "SealBackend"),
            "native": ("medhe.he.ckks.backends.native", "NativeBackend")}
AUTO_ORDER = ("native", "seal")
_said_fallback = False
log = logging.getLogger(__name__)


def backend_class(name: str) -> type:
    """The class registered as ``name``; ``ImportError`` when its module cannot be imported here."""
    if name not in BACKENDS:
        raise PlanError(f"unknown CKKS backend {name!r}; choose one of {sorted(BACKENDS) + ['auto']}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def resolve(name: str = "auto") -> str:
    """The backend name ``name`` stands for on this machine (``auto``: the first in AUTO_ORDER that imports)."""
    global _said_fallback
    if name != "auto":
        backend_class(name)
        return name
    for candidate in AUTO_ORDER:
        try:
            backend_class(candidate)
        except ImportError as exc:
            if not _said_fallback:
                _said_fallback = True
                log.warning("medhe: the native CKKS runtime is not built (%s); using the %r backend "
                            "(reinstall with a C++ compiler: pip install -e .)", exc, AUTO_ORDER[-1])
            continue
        return candidate
    raise ImportError("no CKKS backend imports")  # pragma: no cover - seal is a hard dependency


def get_backend(name: "str | Backend | None", params: "CKKSParams") -> "Backend":
    """A backend for ``params``: by registry name (``auto`` when None), or an instance passed through."""
    if name is None:
        name = "auto"
    if not isinstance(name, str):
        return name
    try:
        return backend_class(resolve(name))(params)
    except ImportError as exc:
        raise PlanError(f"the CKKS backend {name!r} is not available here ({exc}); use backend='seal'") from None


__all__ = ["BACKENDS", "backend_class", "resolve", "get_backend"]
