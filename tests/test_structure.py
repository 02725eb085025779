"""The shape the code keeps: short functions, one atomic writer, inference independent of training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 80


def _trees():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_function_over_80_lines():
    long = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_only_hdmil_files_renames_into_place():
    calls = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("replace", "rename") and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "os"
    ]
    assert len(calls) == 1 and calls[0].startswith("hdmil/files.py:"), calls


def test_inference_imports_nothing_from_training():
    code = (
        "import sys, hdmil.pipeline, hdmil.inference, hdmil.checkpoint; "
        "print(sorted(m for m in sys.modules if m.startswith('hdmil.train') or m.startswith('hdmil.recipe')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_widget_module_only_assembles():
    widget = SRC / "napari_hdmil" / "_widget.py"
    assert len(widget.read_text(encoding="utf-8").splitlines()) <= 250
