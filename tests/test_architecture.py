"""The package's import graph keeps the layering docs/architecture.md describes.

The graph is built from every import statement of every module, including imports inside functions (those hide a
dependency as well as a top-level one does): module → the project modules it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Who may import the embedded platform: the launchers decide what runs locally; the benchmarks drive it directly.
MAY_IMPORT_LOCAL = ("cookbook.local", "launchers", "scripts")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement of the file imports: `from a.b import c` imports a.b, and a.b.c when c
    is a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Edges between the modules under `root/<package>`; imports of anything else (the standard library,
    third-party packages) are dropped."""
    files = project_files(root, packages)
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(path):
            while imported and imported not in files:  # `a.b.X` where X is a name in module a.b
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def local_importers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    def is_local(m: str) -> bool:
        return m == "cookbook.local" or m.startswith("cookbook.local.")

    return {m: {t for t in targets if is_local(t)} for m, targets in graph.items()
            if not any(m == p or m.startswith(p + ".") for p in MAY_IMPORT_LOCAL) and any(map(is_local, targets))}


def test_the_core_never_imports_the_embedded_platform():
    graph = import_graph(REPO, ("cookbook", "launchers", "scripts"))
    assert "cookbook.runs.runner" in graph and "cookbook.local.platform" in graph  # the graph covers both sides
    assert "cookbook.local.platform" in graph["launchers.local"]  # and sees imports inside functions
    assert local_importers(graph) == {}


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph(REPO, ("cookbook", "launchers"))) == []


def test_nothing_outside_tests_imports_from_tests():
    # By package name, or by a helper's bare name after putting tests/ on sys.path.
    test_modules = {"tests"} | {p.stem for p in (REPO / "tests").glob("*.py")}
    offenders = {name: {n for n in imported_names(path) if n.split(".")[0] in test_modules}
                 for name, path in project_files(REPO, ("cookbook", "launchers", "scripts")).items()}
    assert {name: names for name, names in offenders.items() if names} == {}


def test_the_checks_catch_a_hidden_cycle_and_a_core_import_of_the_platform(tmp_path):
    """The same checks on a small tree with both faults, each hidden inside a function."""
    pkg = tmp_path / "cookbook"
    (pkg / "local").mkdir(parents=True)
    (pkg / "datasets").mkdir()
    for init in (pkg, pkg / "local", pkg / "datasets"):
        (init / "__init__.py").write_text("")
    (pkg / "local" / "models.py").write_text("X = 1\n")
    (pkg / "datasets" / "rows.py").write_text("def f():\n    from cookbook.datasets import render\n")
    (pkg / "datasets" / "render.py").write_text("from cookbook.datasets.rows import f\n"
                                                "def g():\n    from cookbook.local.models import X\n")
    graph = import_graph(tmp_path, ("cookbook",))
    assert cycles(graph) == [["cookbook.datasets.render", "cookbook.datasets.rows"]]
    assert local_importers(graph) == {"cookbook.datasets.render": {"cookbook.local.models"}}
