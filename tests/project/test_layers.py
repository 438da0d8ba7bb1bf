"""The package's shape: layers that only import downwards, no import cycles, each constant once.

The layers contract lives in pyproject.toml ([tool.importlinter]); ARCHITECTURE.md explains it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import grimp
import pytest

from tests.conftest import REPO

PACKAGE = REPO / "deforest"


def test_the_layers_contract_holds():
    """cli > runs > mapping > training > data | models > core: an import upwards fails here."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_import_cycle_between_modules():
    """No cycle between modules (e.g. two stores importing each other): every import edge a -> b
    has no chain of imports from b back to a, lazy imports inside functions included."""
    graph = grimp.build_graph("deforest", cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported.startswith("deforest.") and graph.find_shortest_chain(importer=imported, imported=importer):
                cycles.append(f"{importer} <-> {imported}")
    assert cycles == []


def _module_constants() -> dict[str, list[tuple[str, str]]]:
    """UPPER_CASE names bound at module level: name -> [(module, source of the value)]."""
    found = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) and node.value else []
            for target in targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts))  # A, B = 1, 2
                for name, value in pairs:
                    if isinstance(name, ast.Name) and name.id.isupper() and not name.id.startswith("_"):
                        found[name.id].append((module, ast.unparse(value)))
    return found


def test_each_constant_is_defined_once():
    """A constant has one home (the others import it): two definitions drift apart."""
    twice = {name: [m for m, _ in where] for name, where in _module_constants().items() if len(where) > 1}
    assert twice == {}


def test_no_two_constants_spell_the_same_value():
    """The same tuple or long string under two names (``TILE_SUFFIXES`` beside ``TIFF_SUFFIXES``) is one
    constant defined twice."""
    by_value = defaultdict(list)
    for name, where in _module_constants().items():
        for module, value in where:
            literal = value.startswith(("(", "[", "frozenset(", '"', "'")) and len(value) >= 12
            if literal:
                by_value[value].append(f"{module}.{name}")
    assert {v: names for v, names in by_value.items() if len(names) > 1} == {}


@pytest.mark.parametrize("package", ["core", "data", "models", "training", "mapping", "runs"])
def test_each_package_exports_its_public_names(package):
    """``from deforest.<package> import Name`` works for every name in the package's ``__all__``,
    and each is defined in one of its modules (exports resolve lazily, so importing the data
    package does not import torch for the torch-free map writer)."""
    pkg = importlib.import_module(f"deforest.{package}")
    assert len(pkg.__all__) >= 3
    for name in pkg.__all__:
        value = getattr(pkg, name)
        if inspect.isclass(value) or inspect.isfunction(value):  # constants and type aliases name no module
            assert value.__module__.startswith(f"deforest.{package}."), (name, value.__module__)
    with pytest.raises(AttributeError, match="has no attribute"):
        getattr(pkg, "NoSuchName")
