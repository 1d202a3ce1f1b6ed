"""control_plane's imports run one way: the graph of its modules (every import statement, at module level or
inside a function, read with ast) has no cycle, and no import hides inside a function to dodge one."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "control_plane"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules an import statement loads: ``from a.b import c`` loads a.b.c when that is a
    module, else a.b."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        source = _absolute(node, importer, is_package)
        names = {f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names}
    found = set()
    for name in names:
        while name and name not in known:  # `import a.b.c` of a package's module: the module itself
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, and whether it sits inside a function."""

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from walk(child, inside)

    return walk(tree, False)


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package's modules it imports; and the function-level imports of package modules."""
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    local: list[str] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _imports(tree):
            targets = imported(node, name, path.name == "__init__.py", set(known)) - {name}
            graph[name] |= targets
            if in_function and targets:
                local.append(f"{name}:{node.lineno} imports {', '.join(sorted(targets))} inside a function")
    return graph, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_control_plane_has_no_import_cycle() -> None:
    graph, _ = import_graph()
    assert len(graph) > 50 and "control_plane.api.routes" in graph
    assert cycles(graph) == []


def test_no_import_hides_inside_a_function() -> None:
    _, local = import_graph()
    assert local == []


# -- the walker itself, on a package written for the purpose ---------------------------------------------


@pytest.fixture
def package(tmp_path: Path) -> Path:
    root = tmp_path / PACKAGE
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from control_plane.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from . import c\n",
        "sub/c.py": "def late():\n    from ..a import x\n    return x\n",
        "d.py": "import control_plane.sub.c\nfrom control_plane import a\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_walker_finds_a_cycle_through_a_function_level_import(package: Path) -> None:
    graph, local = import_graph(package)
    assert graph["control_plane.a"] == {"control_plane.sub.b"}
    assert graph["control_plane.sub.b"] == {"control_plane.sub.c"}
    assert graph["control_plane.sub.c"] == {"control_plane.a"}
    assert graph["control_plane.d"] == {"control_plane.sub.c", "control_plane.a"}
    assert cycles(graph) == [["control_plane.a", "control_plane.sub.b", "control_plane.sub.c"]]
    assert local == ["control_plane.sub.c:2 imports control_plane.a inside a function"]


def test_the_walker_passes_a_graph_that_runs_one_way(package: Path) -> None:
    (package / "sub" / "c.py").write_text("X = 1\n")
    graph, local = import_graph(package)
    assert cycles(graph) == [] and local == []
