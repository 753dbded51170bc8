"""The package's layers, checked on its import graph (every import, lazy ones included).

1. **Utilities** (``lightning_privacy._validation``, ``._registry``) import nothing of the package.
2. **Functional** (``lightning_privacy.functional``): pure functions on tensors and modules.
3. **Components** (``defenses``, ``attacks``, ``accountants``, ``metrics``, ``leakage``,
   ``engines``, ``membership``, the plain-torch reference models in ``models`` and the embedded
   data in ``data``).
4. **Lightning integration** (``callbacks``, ``sweep``, ``report``, ``cli``, ``models.lit``,
   ``data.datamodules``; ``models`` and ``data`` re-export the last two lazily, on first use).

A module imports only from its own layer or below, and nothing in layers 1-3 imports Lightning,
not even through another module of the package (importing ``a.b.c`` runs ``a/__init__`` and
``a/b/__init__`` too, so those count). The graph has no circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_privacy"
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")

#: Layer of each module, by the longest matching dotted prefix.
LAYERS = {
    "lightning_privacy": 0,
    "lightning_privacy._validation": 0,
    "lightning_privacy._registry": 0,
    "lightning_privacy.functional": 1,
    "lightning_privacy.defenses": 2,
    "lightning_privacy.attacks": 2,
    "lightning_privacy.accountants": 2,
    "lightning_privacy.metrics": 2,
    "lightning_privacy.leakage": 2,
    "lightning_privacy.engines": 2,
    "lightning_privacy.membership": 2,
    "lightning_privacy.adapters": 2,
    "lightning_privacy.models": 2,
    "lightning_privacy.data": 2,
    "lightning_privacy.models.lit": 3,
    "lightning_privacy.data.datamodules": 3,
    "lightning_privacy.callbacks": 3,
    "lightning_privacy.sweep": 3,
    "lightning_privacy.report": 3,
    "lightning_privacy.cli": 3,
    "lightning_privacy.__main__": 3,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports (absolute, lazy ones too), resolved against ``known``."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that can run: imports under ``if TYPE_CHECKING:`` never do."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)
    return nodes


def with_parents(module: str) -> list[str]:
    """``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it causes to run}`` for every module of the package under ``root``."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        edges = set()
        for target in imported_modules(path, name, known):
            edges.update(t for t in with_parents(target) if t != name)
        graph[name] = edges
    return graph


def layer(module: str) -> int:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return LAYERS[max(matches, key=len)]


def reaches_lightning(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """An import chain from ``start`` to Lightning, or ``None``."""
    seen, stack = {start}, [[start]]
    while stack:
        chain = stack.pop()
        for target in sorted(graph.get(chain[-1], ())):
            if target.split(".")[0] in LIGHTNING:
                return [*chain, target]
            if target in graph and target not in seen:
                seen.add(target)
                stack.append([*chain, target])
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle between package modules (explicit imports, no parent packages)."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if target not in graph:
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                found = visit(target, [*path, target])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def explicit_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Like :func:`import_graph`, without the implicit edges to parent packages."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {
        name: {t for t in imported_modules(path, name, known) if t != name and t in known}
        for name, path in files.items()
    }


def layering_violations(root: Path = PACKAGE) -> list[str]:
    graph = import_graph(root)
    problems = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            if target in graph and layer(target) > layer(module):
                problems.append(
                    f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
                )
        if layer(module) < 3:  # importing it runs its parent packages too
            for start in with_parents(module):
                chain = reaches_lightning(graph, start)
                if chain:
                    problems.append(f"{module} reaches Lightning: {' -> '.join(chain)}")
                    break
    return problems


def test_every_module_has_a_layer():
    for module in import_graph():
        layer(module)


def test_imports_only_point_down_and_below_the_callbacks_nothing_reaches_lightning():
    assert layering_violations() == []


def test_no_import_circle_in_the_package():
    assert find_cycle(explicit_graph()) is None


def test_the_check_catches_a_functional_module_importing_lightning(tmp_path):
    import shutil

    copy = tmp_path / "lightning_privacy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "functional" / "defenses.py"
    target.write_text("import lightning\n" + target.read_text())
    problems = layering_violations(copy)
    print("\n".join(problems))
    assert any(
        p.startswith("lightning_privacy.functional.defenses reaches Lightning:")
        and p.endswith("lightning_privacy.functional.defenses -> lightning")
        for p in problems
    )
    assert any(p.startswith("lightning_privacy.defenses.") for p in problems)  # and transitively


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "package",
    [name for name, level in LAYERS.items() if 0 < level < 3],
)
def test_importing_a_lower_layer_leaves_lightning_out(package):
    code = (
        f"import sys, {package}; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
