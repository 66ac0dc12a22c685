"""The one-way import order of docs/architecture.md, checked on the source: a layer never imports a higher one."""

import ast
from pathlib import Path

import medhe

ORDER = ("data", "models", "he", "service", "pacs", "ui", "cli")
#: exceptions to the order; ``load_eval_data`` moved to medhe.data.evalsplit emptied it. New code must not add any.
KNOWN: set[str] = set()


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


def test_only_the_cli_imports_the_cli():
    """Modules outside the layers (reporting, experiments, the SDK alias) sit below the CLI too."""
    root = Path(medhe.__file__).parent
    wrong = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "cli" or rel.as_posix() == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            wrong += [f"{rel} imports {name}" for name in names if name == "medhe.cli" or name.startswith("medhe.cli.")]
    assert not wrong, "; ".join(wrong)
