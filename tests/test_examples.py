"""The scripts in examples/ (the README's tables are made with them) still import what they use: every
``from qcompiler... import name`` names a module or an attribute that exists, and the argparse ones print
their usage."""

import ast
import importlib
import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_qcompiler_import_of_the_example_resolves(path):
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qcompiler":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qcompiler":
                    importlib.import_module(alias.name)
    assert not missing, f"{path.name}: {missing}"


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "argparse" in p.read_text()], ids=lambda p: p.name)
def test_argparse_examples_print_their_usage(path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [path.name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
