"""The package's shape: every import (lazy ones included) points down, so modules form no circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bntool"


def _imports(path: Path, depth: int) -> set[str]:
    """The bntool modules a file imports anywhere in its body; `depth`: 0 for bntool/x.py, 1 inside a
    subpackage (whose own modules it reaches with one dot, and bntool's with two)."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == depth + 1:
            if node.module:
                deps.add(node.module.split(".")[0])
            else:  # from .. import x
                deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bntool."):
            deps.add(node.module.split(".")[1])
    return deps


def _exists(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """Module name → the bntool modules it imports anywhere in its body. A subpackage (bntool/folding/) is one
    module: the union of its files' imports of bntool modules."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        graph[path.stem] = {d for d in _imports(path, 0) if _exists(d) and d != path.stem}
    for init in PACKAGE.glob("*/__init__.py"):
        name = init.parent.name
        deps = set().union(*(_imports(p, 1) for p in init.parent.glob("*.py")))
        graph[name] = {d for d in deps if _exists(d) and d != name}
    return graph


def package_graph(package: str) -> dict[str, set[str]]:
    """Within a subpackage: file → the files of the same package it imports."""
    files = {p.stem: p for p in (PACKAGE / package).glob("*.py")}
    graph = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[name] = {d for d in deps if d in files and d != name}
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
    assert graph["files"] <= {"errors", "tempfiles"}
    assert graph["tempfiles"] <= {"errors"}
    assert graph["layout"] <= {"errors", "layers", "rewrite"}
    assert graph["rewrite"] <= {"errors", "layers"}
    assert graph["layers"] <= {"devices"}
    assert graph["choices"] <= {"utils"}
    assert graph["compare"] <= {"errors", "utils", "devices"}
    assert graph["devices"] <= {"errors"}
    assert graph["arch"] <= {"errors", "utils"}
    assert graph["checkpoint"] <= {"errors", "utils", "files", "layout", "layers", "choices", "arch"}
    # The CLI's groups import lazily, and only downward.
    assert graph["options"] <= {"errors", "choices", "checkpoint", "data", "devices", "segments"}


# The README's module map, top to bottom: a module may import only modules after it.
MODULE_ORDER = [
    "__main__", "cli", "options", "report", "report_json", "plot", "demo", "zoo", "verification",
    "verification_onnx", "onnx_fold",
    "onnx_surgery", "onnx_merge", "onnx_fold_check", "onnx_graph", "onnx_export", "inspection",
    "onnx_recalibration", "onnx_segments", "onnx_check", "recalibration", "recalibration_exact",
    "recalibration_passes", "distributed", "segments", "folding", "merging", "merge_math", "checkpoint",
    "onnx_save", "onnx_model", "arch", "data", "images", "preprocessing", "compare", "graph", "layout", "rewrite",
    "layers", "devices", "files", "tempfiles", "choices", "utils", "errors", "_version", "__init__",
]


def test_imports_follow_the_module_map():
    graph = import_graph()
    assert set(graph) == set(MODULE_ORDER), set(graph) ^ set(MODULE_ORDER)
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    upward = [(m, d) for m, deps in graph.items() if m != "__init__" for d in deps if rank[d] <= rank[m]]
    assert not upward, f"imports against the module map: {upward}"


# Each subpackage, top to bottom: a file may import only files after it.
PACKAGE_ORDERS = {
    "folding": ["__init__", "api", "torch_plan", "check", "surgery", "torch_graph", "report", "planner", "math"],
    # One module per command, on the Typer app and what the commands share; `runner` maps errors to exit codes.
    "cli": ["__init__", "runner", "inspect", "fold", "recalibrate", "export", "verify", "demo", "shared", "app"],
}


@pytest.mark.parametrize("package", sorted(PACKAGE_ORDERS))
def test_package_follows_its_order(package):
    order = PACKAGE_ORDERS[package]
    graph = package_graph(package)
    assert set(graph) == set(order), set(graph) ^ set(order)
    rank = {name: i for i, name in enumerate(order)}
    upward = [(m, d) for m, deps in graph.items() for d in deps if rank[d] <= rank[m]]
    assert not upward, f"imports against the {package} package's order: {upward}"


def test_planner_and_math_see_no_module():
    # The planner and the math are graph-agnostic: they never see a module, a trace or a model file.
    for name in ("planner", "math"):
        text = (PACKAGE / "folding" / f"{name}.py").read_text()
        assert "nn.Module" not in text and "OpCall" not in text, name


MAX_LINES = 500


def test_no_module_is_too_long():
    """A module over MAX_LINES lines says why in its docstring, in a sentence starting "Long because"."""
    long = []
    for path in [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")]:
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES and "Long because" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(str(path.relative_to(PACKAGE)))
    assert long == [], sorted(long)


def test_every_module_states_its_job():
    for path in [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if path.name in ("__main__.py", "_version.py"):
            continue
        assert doc and doc.splitlines()[0].strip(), f"{path.name} has no one-line docstring saying its job"
