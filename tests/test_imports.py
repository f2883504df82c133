"""The shape of the code: no import circle in vaekit, no long function in training/.

Both are read from the source with ``ast`` (nothing is imported). An import counts wherever it
is written (at module level or inside a function: a lazy import still ties the two modules
together) except under ``if TYPE_CHECKING:``, which never runs, and ``from vaekit import
__version__`` (the version string, read lazily by the registry and the CLI: metadata, not a use of
the façade's API). ``from pkg import name`` is an edge to the module ``pkg.name`` when there is
one, else to ``pkg``; importing ``pkg.sub`` does not count as importing ``pkg``'s ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vaekit"
MAX_LINES = 60  # per function in training/


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the vaekit modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base == PACKAGE and all(a.name == "__version__" for a in node.names):
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_from_imports_resolve_to_modules():
    graph = import_graph()
    assert "vaekit.training.callbacks" in graph["vaekit.training.trainer"]
    # from vaekit.training import distributed: the module, not the package
    assert "vaekit.training.distributed" in graph["vaekit.training.selection"]
    # TYPE_CHECKING-only: the protocol's annotations do not count
    assert "vaekit.models.base" not in graph["vaekit.training.callbacks"]
    # a lazy import counts: training reaches the registry only to resolve a reference, but it does
    assert "vaekit.registry" in graph["vaekit.training.finetune"]


# Known circles, each an edge (importer, imported) that closes one, with why it is tolerated for now. Each
# entry must still exist (the test fails when it is gone, so the list cannot go stale); nothing else may.
KNOWN_CIRCLES: set[tuple[str, str]] = set()  # none: a new circle fails the test


def test_vaekit_has_no_import_circle():
    graph = import_graph()
    for importer, imported in KNOWN_CIRCLES:
        assert imported in graph[importer], f"{importer} -> {imported} is gone: remove it from KNOWN_CIRCLES"
        graph[importer] = graph[importer] - {imported}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def _long_functions(root: Path, limit: int) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


@pytest.mark.parametrize("limit", [MAX_LINES])
def test_no_function_in_training_is_longer_than_60_lines(limit):
    assert _long_functions(SRC / PACKAGE / "training", limit) == []
