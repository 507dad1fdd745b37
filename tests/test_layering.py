"""The architecture as a test: no import cycles, imports point down the layers, short files and functions.

Layers (DESIGN.md): ``qcompiler.tools`` and the package's public facade -> the composition root
(``backend``, ``pipeline``, ``plan``, ``report``, ``dump``, ``artifact``, ``calibration``) ->
``passes`` / ``lowering`` (never each other) -> ``config`` -> ``core``. Every import counts, including
the ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"qcompiler": ROOT / "qcompiler", "qcompiler.passes": ROOT / "passes",
                "qcompiler.lowering": ROOT / "lowering"}
ROOT_MODULES = {"backend", "pipeline", "plan", "report", "dump", "artifact"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"  # on the def line or the line above: why this function is longer


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "qcompiler" and parts[:1] in (["passes"], ["lowering"]):
                continue
            out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the package whose ``__init__`` holds it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Project modules ``module`` imports: ``from X import y`` is the module ``X.y`` when there is one,
    else ``X`` (or the package whose ``__init__`` defines it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in map(_resolve, (t for t in targets if t.startswith("qcompiler"))) if t not in (None, module))
    return found


GRAPH = nx.DiGraph()
for _name, _path in MODULES.items():
    GRAPH.add_node(_name)
    for _target in _imports(_name, _path):
        GRAPH.add_edge(_name, _target)


def layer(module: str) -> int:
    parts = module.split(".")
    if module == "qcompiler" or parts[1] == "tools":
        return 4
    if parts[1] in ("passes", "lowering"):
        return 2
    if parts[1] == "config":
        return 1
    if parts[1] == "core":
        return 0
    if parts[1] in ROOT_MODULES or parts[1] == "calibration":
        return 3
    raise AssertionError(f"{module} belongs to no layer: place it in DESIGN.md's layout and in this test")


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_cycles():
    cycles = [c for c in nx.strongly_connected_components(GRAPH) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_down_the_layers():
    wrong = [(a, b) for a, b in GRAPH.edges if layer(b) > layer(a)]
    assert not wrong, f"imports of a higher layer: {wrong}"


def test_passes_and_lowering_import_only_core_and_config():
    for a, b in GRAPH.edges:
        kind = a.split(".")[1] if "." in a else ""
        if kind in ("passes", "lowering"):
            assert b.split(".")[1] in (kind, "core", "config"), f"{a} imports {b}"


def test_core_imports_nothing_else():
    for a, b in GRAPH.edges:
        if a.startswith("qcompiler.core"):
            assert b.startswith("qcompiler.core"), f"{a} imports {b}"


def test_the_graph_sees_real_edges():
    # the test would pass vacuously if imports were not found
    assert ("qcompiler.backend", "qcompiler.pipeline") in GRAPH.edges
    assert ("qcompiler.passes.insert_qdq", "qcompiler.core.ir") in GRAPH.edges
    assert ("qcompiler.lowering.fuse", "qcompiler.lowering.patterns") in GRAPH.edges


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_are_short(module):
    path = MODULES[module]
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_FILE_LINES, f"{path} has {len(lines)} lines (at most {MAX_FILE_LINES}): split it"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            length = node.end_lineno - start + 1
            marked = any(LONG_MARK in lines[i - 1] for i in (start - 1, node.lineno) if i >= 1)
            assert length <= MAX_FUNCTION_LINES or marked, (
                f"{path}:{node.lineno} {node.name} has {length} lines (at most {MAX_FUNCTION_LINES}, or say why "
                f"with '{LONG_MARK} ...' next to it)")
