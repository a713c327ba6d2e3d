"""The import graph of the project's packages (issue 18): read with `ast` (nothing imported),
module-level and function-level imports, relative imports resolved.

    - packages point one way: pipelines -> (dataprep, pippo_model, cluster) -> pippo_common;
      pippo_model never imports dataprep, and dataprep never imports pippo_model (the camera
      vectors are made on the model side: pipelines.training.engine.to_model_space)
    - no cycle between modules through module-level imports (the ones that run at import time;
      `if TYPE_CHECKING:` blocks excluded)
    - no library module imports the CLI (pipelines.cli*)
    - no module over 600 lines
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("dataprep", "pipelines", "pippo_model", "pippo_common", "cluster")
MAX_LINES = 600

# README's layout; every import counts, top-level or inside a function.
ALLOWED = {"pippo_common": set(), "dataprep": {"pippo_common"}, "pippo_model": {"pippo_common"},
           "cluster": {"pippo_common"},
           "pipelines": {"pippo_common", "dataprep", "pippo_model", "cluster"}}


@dataclass(frozen=True)
class Edge:
    source: str          # importing module, dotted
    target: str          # imported project module, dotted
    line: int
    module_level: bool   # runs when `source` is imported


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module_level: bool = True):
    """(node, module_level) for every import; function bodies are not module level, and
    `if TYPE_CHECKING:` bodies are skipped (they never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, module_level
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]), module_level)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _imports(node, False)
        else:
            yield from _imports(node, module_level)


def edges(mods: dict[str, Path]) -> list[Edge]:
    out = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node, top in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:        # relative: from the package holding this module
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:        # `import a.b.x` where x is not a module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.append(Edge(name, t, node.lineno, top))
    return out


MODS = modules()
EDGES = edges(MODS)


def test_the_walker_sees_module_and_function_level_imports():
    """The walker itself: it must find imports at both levels, or every check below is vacuous."""
    assert len(MODS) > 50
    assert any(e.module_level for e in EDGES) and any(not e.module_level for e in EDGES)
    lazy = {(e.source, e.target) for e in EDGES if not e.module_level}
    assert ("pipelines.evaluation", "pipelines.training.engine") in lazy      # inside generate()
    assert any(e.source == "pippo_model.model" and e.target == "pippo_model.config" for e in EDGES)  # relative


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package):
    """So no import cycle can form between packages, and pippo_common is a leaf."""
    bad = [f"{MODS[e.source].relative_to(REPO)}:{e.line} imports {e.target}" for e in EDGES
           if e.source.split(".")[0] == package and e.target.split(".")[0] != package
           and e.target.split(".")[0] not in ALLOWED[package]]
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}          # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        if e.module_level:
            graph.setdefault(e.source, set()).add(e.target)
    cycle = _cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def _is_cli(module: str) -> bool:
    return module == "pipelines.cli" or module.startswith(("pipelines.cli.", "pipelines.cli_"))


def test_no_library_module_imports_the_cli():
    """pipelines/ as rooms: the CLI package (pipelines/cli/) calls the libraries, never the reverse."""
    bad = [f"{e.source} -> {e.target}" for e in EDGES if _is_cli(e.target) and not _is_cli(e.source)]
    assert not bad, bad


def test_no_module_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in MODS.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
