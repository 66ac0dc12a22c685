"""The one-way import order of docs/architecture.md, checked on the source: a layer never imports a higher one."""

import ast
from pathlib import Path

import medhe

ORDER = ("data", "models", "he", "service", "pacs", "ui", "cli")
#: found when this test was written; to fix by moving ``load_eval_data`` below the CLI (e.g. into medhe.data), then
#: delete the entries. New code must not add any.
KNOWN = {
    "he/ckks/batch/bench.py imports medhe.cli.evaluate",
    "he/ckks/measure.py imports medhe.cli.evaluate",
}


def test_no_module_imports_a_higher_layer():
    root = Path(medhe.__file__).parent
    wrong = []
    for path in sorted(root.rglob("*.py")):
        layer = path.relative_to(root).parts[0]
        if layer not in ORDER:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "medhe" and len(parts) > 1 and parts[1] in ORDER \
                        and ORDER.index(parts[1]) > ORDER.index(layer):
                    wrong.append(f"{path.relative_to(root)} imports {name}")
    new = sorted(set(wrong) - KNOWN)
    assert not new, "imports against data -> models -> he -> service -> pacs -> ui -> cli: " + "; ".join(new)
