"""Layering of ``fedlt_app``: no import cycles, and no experiment tooling inside a federation.

The import graph is read from the source with ``ast`` (nothing is imported),
so lazy imports inside functions count as much as module-level ones: a cycle
closed by a function-level import is still two modules that each need the
other, only hidden until the call. Shared pieces belong below their users.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "fedlt_app"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Experiment tooling: starts, sweeps and reports on runs from outside a federation.
TOOLING = ("fedlt_app.sweep", "fedlt_app.sweep_grid", "fedlt_app.sweep_results", "fedlt_app.report",
           "fedlt_app.report_plots", "fedlt_app.launch", "fedlt_app.collect")
# Command-line runners that live next to federation code but are tooling themselves (compare runs launch.run,
# plot reports on finished runs with report's convergence rule).
RUNNERS = ("fedlt_app.active.compare", "fedlt_app.active.plot")
# Everything else is federation code: the ServerApp, the ClientApp and what they build on (strategy, train,
# methods, data, models, task, metrics, precision, results, active, ...), and new modules count by default.
ENTRY_POINTS = ("fedlt_app.client_app", "fedlt_app.server_app")


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package_dir`` (a package's name for its ``__init__``)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> Iterable[str]:
    """The package modules one import statement loads, resolved against ``known``."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        names: list[str | None] = [None] * len(bases)
    else:
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            anchor = here[: len(here) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        bases = [base] * len(node.names)
        names = [alias.name for alias in node.names]
    for base, name in zip(bases, names, strict=True):
        if name is not None and f"{base}.{name}" in known:  # ``from pkg import submodule``
            yield f"{base}.{name}"
            continue
        while base and base not in known:  # ``import a.b.c`` of an attribute path: its longest module prefix
            base = base.rpartition(".")[0]
        if base:
            yield base


def _parents_to_initialise(target: str, importer: str, known: set[str]) -> Iterable[str]:
    """Packages that importing ``target`` runs first: its parents that are not (parents of) the importer.

    ``import a.b.c`` executes ``a/b/__init__.py`` before ``c``; inside ``a.b``
    that package is already initialising, so only outside importers depend on it.
    """
    parts = target.split(".")
    for end in range(1, len(parts)):
        parent = ".".join(parts[:end])
        if parent in known and not (importer == parent or importer.startswith(parent + ".")):
            yield parent


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (module level, functions, classes)."""
    files = module_files(package_dir, package)
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, module, is_package, known):
                    edges.add(target)
                    edges.update(_parents_to_initialise(target, module, known))
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (first node repeated at the end) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the package is small, recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(component, graph) for component in sorted(components)]


def _cycle_through(component: list[str], graph: Mapping[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & inside):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its component {component}")


def _under(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def reachable(graph: Mapping[str, set[str]], roots: Iterable[str]) -> dict[str, list[str]]:
    """Every module the roots load, transitively, with one import chain that gets there."""
    chains = {root: [root] for root in roots}
    frontier = list(chains)
    while frontier:
        node = frontier.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in chains:
                chains[nxt] = chains[node] + [nxt]
                frontier.append(nxt)
    return chains


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE_DIR, PACKAGE)


def test_the_parser_sees_lazy_relative_and_plain_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import x  # lazy, relative\n    return x\n")
    (pkg / "sub" / "twig.py").write_text("from . import leaf\nfrom .leaf import thing\n")
    (pkg / "top.py").write_text("import toy.sub.leaf\nimport numpy\nfrom toy import other\n")
    (pkg / "other.py").write_text("from .sub import thing\n")
    graph = import_graph(pkg, "toy")
    assert graph["toy.sub"] == {"toy.sub.leaf"}
    assert graph["toy.sub.leaf"] == {"toy.top"}
    assert graph["toy.sub.twig"] == {"toy.sub.leaf"}  # its own package is already initialising
    assert graph["toy.top"] == {"toy.sub.leaf", "toy.sub", "toy.other"}  # toy.sub: run before its module
    assert graph["toy.other"] == {"toy.sub"}
    assert cycles(graph) == [["toy.other", "toy.sub", "toy.sub.leaf", "toy.top", "toy.other"]]
    graph["toy.sub.leaf"].clear()  # without the lazy import the package has no cycle
    assert cycles(graph) == []


def test_the_real_graph_is_read(graph: dict[str, set[str]]) -> None:
    """Guards the cycle test against an empty graph: known edges of the package are present."""
    assert "fedlt_app.strategy" in graph["fedlt_app.server_app"]
    assert "fedlt_app.data.partition" in graph["fedlt_app.data"]  # relative import in a package __init__
    assert "fedlt_app.active.protocol" in graph["fedlt_app.active.driver"]  # ``from pkg import submodule``
    assert "fedlt_app.run_plots" in graph["fedlt_app.results"]  # a function-level import


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles in fedlt_app (move the shared piece below both users):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found
    )


def test_federation_modules_never_import_experiment_tooling(graph: dict[str, set[str]]) -> None:
    federation = [m for m in graph if not _under(m, TOOLING + RUNNERS)]
    assert {"fedlt_app.server_app", "fedlt_app.methods.base", "fedlt_app.active.driver"} <= set(federation)
    assert all(m in graph for m in TOOLING + RUNNERS)  # a renamed tool would silently drop out of the check
    direct = sorted(f"{m} imports {t}" for m in federation for t in graph[m] if _under(t, TOOLING + RUNNERS))
    assert not direct, "federation code imports experiment tooling:\n" + "\n".join(direct)
    chains = reachable(graph, ENTRY_POINTS)
    loaded = sorted(" -> ".join(chain) for module, chain in chains.items() if _under(module, TOOLING + RUNNERS))
    assert not loaded, "the Server/ClientApp load experiment tooling:\n" + "\n".join(loaded)
