"""The package's shape: every import (lazy ones included) points down, so modules form no circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bntool"


def import_graph() -> dict[str, set[str]]:
    """Module name → the bntool modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:  # from . import x
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bntool."):
                deps.add(node.module.split(".")[1])
        graph[name] = {d for d in deps if (PACKAGE / f"{d}.py").exists() and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    graph = import_graph()
    assert {"checkpoint", "folding", "utils", "files", "layout"} <= set(graph)
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_shared_modules_stand_below_the_jobs():
    graph = import_graph()
    assert graph["utils"] <= {"errors"}
    assert graph["files"] <= {"errors"}
    assert graph["layout"] <= {"errors", "layers"}
    assert graph["layers"] <= {"devices"}
    assert graph["choices"] <= {"utils"}
    assert graph["compare"] <= {"errors", "utils", "devices"}
    assert graph["devices"] <= {"errors"}
    assert graph["arch"] <= {"errors", "utils"}
    assert graph["checkpoint"] <= {"errors", "utils", "files", "layout", "layers", "choices", "arch"}
    # The CLI's groups import lazily, and only downward.
    assert graph["options"] <= {"errors", "checkpoint", "data", "folding", "devices"}


# The README's module map, top to bottom: a module may import only modules after it.
MODULE_ORDER = [
    "__main__", "cli", "options", "report", "plot", "demo", "zoo", "verification", "onnx_export", "inspection",
    "onnx_recalibration", "recalibration", "distributed", "segments", "folding", "checkpoint", "arch", "data",
    "compare", "graph", "layout", "layers", "devices",
    "files", "choices", "utils", "errors", "_version", "__init__",
]


def test_imports_follow_the_module_map():
    graph = import_graph()
    assert set(graph) == set(MODULE_ORDER), set(graph) ^ set(MODULE_ORDER)
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    upward = [(m, d) for m, deps in graph.items() if m != "__init__" for d in deps if rank[d] <= rank[m]]
    assert not upward, f"imports against the module map: {upward}"


def test_every_module_states_its_job():
    for path in PACKAGE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if path.name in ("__main__.py", "_version.py"):
            continue
        assert doc and doc.splitlines()[0].strip(), f"{path.name} has no one-line docstring saying its job"
