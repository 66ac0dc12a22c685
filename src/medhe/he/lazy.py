"""The one import style of the scheme packages: public names resolved on first use, so importing a package is cheap
(no SEAL, Concrete or torch until a compile or client is asked for)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, table: dict[str, str | tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``table`` maps a public name to ``module`` (same attribute name)
    or ``(module, attribute)``."""

    def __getattr__(name: str) -> Any:
        entry = table.get(name)
        if entry is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = entry if isinstance(entry, tuple) else (entry, name)
        return getattr(importlib.import_module(module), attr)

    __getattr__.exports = frozenset(table)  # type: ignore[attr-defined]  # what it offers, known without importing
    return __getattr__
