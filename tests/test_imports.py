"""The project's import graph: no cycle, and `common/` depends on nothing above it.

Every import counts, wherever it sits: at the top, inside a function (a "lazy" import only moves a
cycle to run time) and under `if TYPE_CHECKING:` (a cycle of types is a cycle of design). The graph
is read from the source with `ast`, so nothing is imported to build it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "deploy", "fedliver", "simulations")
ABOVE_COMMON = ("client", "server", "fedliver", "simulations", "deploy")


def project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every .py file under `packages` (no __pycache__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                parts = path.relative_to(root).with_suffix("").parts
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that importing `name` imports: each import statement anywhere in the file,
    resolved to the deepest project module it names (`from pkg import x` is `pkg.x` when that is a
    module), plus the packages above it whose `__init__` runs on the way, except the importer's own
    packages (already initialising: a package importing its children is not a cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):  # `import a.b.c` or `from a.b.c import f`: the deepest module
            candidate = ".".join(parts[:i])
            if candidate in modules:
                targets.add(candidate)
                targets.update(a for a in _ancestors(candidate) if a in modules)
                return

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..y import z
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # from pkg import submodule
                    add(f"{source}.{alias.name}")
                else:
                    add(source)
    own = set(_ancestors(name)) | {name}
    return targets - own


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each as a
    closed path [a, b, ..., a] through the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the ~100 modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:  # shortest way back to the start, within the component
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            following = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        following.append(w)
                if cycle:
                    break
            frontier = following
        cycles.append(cycle)
    return sorted(cycles)


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """The walker itself, on a small tree: lazy, TYPE_CHECKING, relative and `from pkg import module`
    imports all count; a package's __init__ runs for an importer outside it; the cycle is named."""
    files = {
        "p/__init__.py": "from p import sub\n",
        "p/sub.py": "def f():\n    from q.deep import g\n",
        "p/other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import sub\n",
        "q/__init__.py": "",
        "q/deep.py": "import os\nfrom p.other import x\nfrom p import missing_name\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("p", "q"))
    assert graph == {"p": {"p.sub"}, "p.sub": {"q.deep", "q"}, "p.other": {"p.sub"},
                     "q": set(), "q.deep": {"p.other", "p"}}
    assert find_cycles(graph) == [["p", "p.sub", "q.deep", "p"]]
    real = import_graph()
    assert len(real) > 50 and "common.weights" in real["simulations.benchmarks.bench_transport"]  # lazy imports


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_common_imports_nothing_above_it():
    graph = import_graph()
    bad = sorted(f"{module} -> {target}" for module, targets in graph.items() if module.split(".")[0] == "common"
                 for target in targets if target.split(".")[0] in ABOVE_COMMON)
    assert not bad, "common/ must not import client/, server/, fedliver/, simulations/ or deploy/:\n" + "\n".join(bad)


def test_client_and_server_import_no_launcher_or_experiment():
    """The apps a site and the coordinator run carry no simulation, deployment or CLI code."""
    graph = import_graph()
    bad = sorted(f"{module} -> {target}" for module, targets in graph.items()
                 if module.split(".")[0] in ("client", "server")
                 for target in targets if target.split(".")[0] in ("simulations", "deploy", "fedliver"))
    assert not bad, "client/ and server/ must not import simulations/, deploy/ or fedliver/:\n" + "\n".join(bad)
