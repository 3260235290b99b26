"""The package's import structure, read from the source (every import, including those inside functions): the core
never imports the miniature subpackage, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import ipadapter

ROOT = Path(ipadapter.__file__).resolve().parent
# Layers above the core: these may import the miniature (its commands and the app's default model).
OUTSIDE_CORE = ("ipadapter.miniature", "ipadapter.cli", "ipadapter.app")


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def imports(name: str) -> set[str]:
    """The package's modules `name` imports anywhere in its source (`from pkg import mod` counts as `pkg.mod`)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_imports_inside_functions() -> None:
    assert "ipadapter.pipelines" in imports("ipadapter.miniature.models")  # imported inside a method only


def test_no_import_cycles() -> None:
    assert cycles({name: imports(name) for name in MODULES}) == []


def test_the_core_never_imports_the_miniature() -> None:
    core = [m for m in MODULES if not m.startswith(OUTSIDE_CORE)]
    offenders = {m: sorted(i for i in imports(m) if i.startswith("ipadapter.miniature")) for m in core}
    assert {m: i for m, i in offenders.items() if i} == {}
