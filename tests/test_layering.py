"""Packages import one way: contract at the bottom, producer and worker on it, demo and bench on
top. A lower package never imports a higher one, and no two packages import each other."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

from tests.support import ROOT

# Each package's layer; a module may import only packages of a lower layer, or its own package.
LAYERS = {
    "contract": 0,
    "producer": 1,
    "worker": 1,
    "notifier": 1,
    "sink": 1,
    "demo": 2,
    "bench": 3,
}


def _imports(path: Path) -> set[str]:
    """Top-level names of the packages a module imports."""
    return {name.split(".")[0] for name in _modules(path)}


def _edges() -> set[tuple[str, str, str]]:
    """(package, imported package, module path) for every import between our packages."""
    edges = set()
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target in _imports(path) & LAYERS.keys() - {package}:
                edges.add((package, target, str(path.relative_to(ROOT))))
    return edges


def test_no_package_imports_one_above_or_beside_it() -> None:
    upward = sorted(e for e in _edges() if LAYERS[e[1]] >= LAYERS[e[0]])
    assert upward == []


def test_the_package_graph_has_no_cycle() -> None:
    graph = {(a, b) for a, b, _ in _edges()}
    for a, b in itertools.permutations(LAYERS, 2):
        assert not ((a, b) in graph and _reaches(graph, b, a)), (a, b)


def _reaches(graph: set[tuple[str, str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(b for a, b in graph if a == node)
    return False


def test_tests_import_support_modules_never_conftest() -> None:
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("*.py")
        if "tests.conftest" in _modules(path)
    )
    assert offenders == []


def _modules(path: Path) -> set[str]:
    """Modules a file imports by absolute name; ``from a import b`` counts ``a`` and ``a.b``."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules
