"""The design's layering: compiler (partitioner, passes) and runtime meet only at the
contract modules (``asyncfx.program``, ``asyncfx.plan``, ``asyncfx.schedule``); no
module imports itself back through others; no module mixes concepts past 400 lines; no
line is longer than setup.cfg allows."""
from __future__ import annotations

import ast
import configparser
import pathlib

import networkx as nx
import pytest

import asyncfx

PACKAGE = pathlib.Path(asyncfx.__file__).parent
MAX_LINES = 400


def imported_modules(source: str, package: list[str]) -> set[str]:
    """Every module a file of ``package`` with ``source`` imports, relative imports
    resolved, ``from a import b`` as both ``a`` and ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_of(path: pathlib.Path) -> list[str]:
    return ["asyncfx", *path.relative_to(PACKAGE).parent.parts]


def module_name(path: pathlib.Path) -> str:
    parts = ["asyncfx", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """asyncfx's modules and, as edges, the asyncfx modules each imports: ``from a import
    b`` imports the module ``a.b`` where there is one, else ``a``."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        package = package_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = ".".join((package[:len(package) - node.level + 1] if node.level else [])
                                  + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module
                           for a in node.names]
            else:
                continue
            graph.add_edges_from((name, target) for target in targets if target in files and target != name)
    return graph


@pytest.mark.parametrize("layer, other", [("runtime", "partitioner"), ("partitioner", "runtime"),
                                          ("passes", "runtime")])
def test_compiler_and_runtime_do_not_import_each_other(layer, other):
    forbidden = f"asyncfx.{other}"
    files = sorted((PACKAGE / layer).rglob("*.py"))
    offenders = [f"{path.relative_to(PACKAGE)} imports {name}" for path in files
                 for name in sorted(imported_modules(path.read_text(), package_of(path)))
                 if name == forbidden or name.startswith(f"{forbidden}.")]
    assert files
    assert offenders == []


@pytest.mark.parametrize("layer, other", [("runtime", "partitioner"), ("partitioner", "runtime")])
def test_compiler_and_runtime_reach_each_other_through_no_module(layer, other):
    """Not even through a third module: what the runtime imports, directly or not, holds
    nothing of the partitioner, and the reverse (they share the contract modules)."""
    graph = import_graph()
    for module in [m for m in graph if m == f"asyncfx.{layer}" or m.startswith(f"asyncfx.{layer}.")]:
        reached = [m for m in nx.descendants(graph, module) if m.startswith(f"asyncfx.{other}")]
        assert not reached, f"{module} reaches {reached[0]} by {nx.shortest_path(graph, module, reached[0])}"


def test_no_module_imports_itself_back():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by concept: {long}"


def test_no_line_is_over_the_configured_length():
    """setup.cfg's line limit, for the library, its tests and its benchmarks."""
    config = configparser.ConfigParser()
    config.read(PACKAGE.parent / "setup.cfg")
    limit = config.getint("flake8", "max-line-length")
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tests").glob("*.py"),
             *(PACKAGE.parent / "benchmarks").glob("*.py")]
    long = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > limit]
    assert long == [], f"lines over {limit} characters: {long}"


def test_imports_are_found_absolute_relative_and_nested():
    source = ("import torch\nfrom . import executor\nfrom ..partitioner import plan\n"
              "def late():\n    from asyncfx.passes.split import split\n")
    assert imported_modules(source, ["asyncfx", "runtime"]) == {
        "torch", "asyncfx.runtime", "asyncfx.runtime.executor", "asyncfx.partitioner",
        "asyncfx.partitioner.plan", "asyncfx.passes.split", "asyncfx.passes.split.split"}


def test_a_cycle_through_modules_is_found_and_named(tmp_path, monkeypatch):
    package = tmp_path / "asyncfx"
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("")
    (package / "a" / "one.py").write_text("from asyncfx.a.two import f\n")
    (package / "a" / "two.py").write_text("def f():\n    from asyncfx.a import one\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert [sorted(c) for c in nx.simple_cycles(import_graph())] == [["asyncfx.a.one", "asyncfx.a.two"]]
