"""The package's layers: every import (module-level or inside a function) points down, never up, and
no modules import each other in a cycle. The order is the one the README's Layout section states."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "grain_jax")

# Top to bottom; a unit (sub-package or top-level module) imports only itself and units of lower layers.
LAYERS = [
    {"cli", "configs"},
    {"train", "visualize"},
    {"evaluators", "integrations", "annotate"},
    {"inference"},
    {"convert"},
    {"checkpoints"},
    {"data"},
    {"models", "losses"},
    {"sharding", "batch", "distributed"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module in the package."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE))[:-3].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(root, name)
    return modules


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The package modules imported anywhere in the file (``from P import m`` counts as module P.m)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("grain_jax")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("grain_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__ (a facade)


GRAPH = {name: _imports(path, _modules()) for name, path in _modules().items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in GRAPH} - {None}
    assert units == set(RANK), f"units without a layer: {sorted(units - set(RANK))}; stale: {sorted(set(RANK) - units)}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _unit(m)))
def test_imports_point_down(module):
    unit = _unit(module)
    upward = sorted(imported for imported in GRAPH[module]
                    if _unit(imported) not in (None, unit) and RANK[_unit(imported)] <= RANK[unit])
    assert not upward, f"{module} (layer {RANK[unit]}: {unit}) imports {upward}, which are not below it"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for imported in sorted(GRAPH.get(module, ())):
            if state.get(imported) == 1:
                cycle = path[path.index(imported):] + [imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported in GRAPH and imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
