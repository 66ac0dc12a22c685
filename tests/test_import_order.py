"""The one-way import order of docs/architecture.md, checked on the source: a layer never imports a higher one."""

import ast
import re
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


#: what issue 30's acceptance greps for: a scheme package imported by name (any indentation, so function-level too)
SCHEME_IMPORT = re.compile(r"^\s*(from|import) medhe\.he\.(ckks|tfhe|paillier)\b|^\s*from medhe\.he import .*"
                           r"\b(ckks|tfhe|paillier)\b", re.MULTILINE)


def test_service_cli_and_ui_import_no_scheme_package():
    """They reach every scheme through medhe.he.scheme (the registry and its hooks), so a new scheme is one package:
    ``grep -rnE "^\\s*(from|import) medhe\\.he\\.(ckks|tfhe|paillier)" src/medhe/{service,cli,ui}`` finds nothing."""
    root = Path(medhe.__file__).parent
    found = []
    for layer in ("service", "cli", "ui"):
        for path in sorted((root / layer).rglob("*.py")):
            text = path.read_text()
            found += [f"{path.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0).strip()}"
                      for m in SCHEME_IMPORT.finditer(text)]
    assert not found, "scheme packages imported outside medhe.he: " + "; ".join(found)


def _module_imports() -> dict[str, set[str]]:
    """medhe module -> the medhe modules it imports anywhere in its body (function-level imports included, since
    they still tie the two modules together; ``if TYPE_CHECKING:`` blocks and a module's own packages left out)."""
    root = Path(medhe.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test).endswith("TYPE_CHECKING") for n in ast.walk(block)}
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else (node.module or "")
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
        graph[name] = deps
    return graph


def test_no_import_cycles():
    """A cycle (even through a function-level import) means two modules are one idea split badly."""
    graph = _module_imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
