"""The design's layering: the compiler (partitioner, passes) and the runtime meet only at
the StagePlan, so neither imports the other."""
from __future__ import annotations

import ast
import pathlib

import pytest

import asyncfx

PACKAGE = pathlib.Path(asyncfx.__file__).parent


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


def package_of(path: pathlib.Path) -> list[str]:
    return ["asyncfx", *path.relative_to(PACKAGE).parent.parts]


def test_imports_are_found_absolute_relative_and_nested():
    source = ("import torch\nfrom . import executor\nfrom ..partitioner import plan\n"
              "def late():\n    from asyncfx.passes.split import split\n")
    assert imported_modules(source, ["asyncfx", "runtime"]) == {
        "torch", "asyncfx.runtime", "asyncfx.runtime.executor", "asyncfx.partitioner",
        "asyncfx.partitioner.plan", "asyncfx.passes.split", "asyncfx.passes.split.split"}
