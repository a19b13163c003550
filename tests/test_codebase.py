"""The engine's shape, checked on its source: every function in sam_repro/engine/ fits on a screen (at most 80
lines), none defines a function inside itself (a closure over the loop's state: the trainer passes its state, one
`_Run`, to each piece explicitly), and no engine module replaces a file with `Path.write_text`/`write_bytes` (files
are written atomically through sam_repro/files.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "sam_repro" / "engine"
MAX_LINES = 80
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def engine_modules() -> list[Path]:
    modules = sorted(ENGINE.glob("*.py"))
    assert any(p.name == "trainer.py" for p in modules)
    return modules


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method in `tree`, nested ones included."""
    return [node for node in ast.walk(tree) if isinstance(node, FUNCTIONS)]


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of each function longer than `limit` lines, decorators left out, its docstring counted."""
    return [(f.name, n) for f in functions(ast.parse(source)) if (n := f.end_lineno - f.lineno + 1) > limit]


def nested_functions(source: str) -> list[tuple[str, str]]:
    """(outer, inner) for each function defined inside another (lambdas, one-expression adapters, are allowed)."""
    return [
        (outer.name, inner.name)
        for outer in functions(ast.parse(source))
        for inner in functions(outer)
        if inner is not outer
    ]


@pytest.mark.parametrize("module", engine_modules(), ids=lambda p: p.name)
def test_engine_functions_are_at_most_80_lines(module: Path):
    assert long_functions(module.read_text()) == []


@pytest.mark.parametrize("module", engine_modules(), ids=lambda p: p.name)
def test_engine_functions_define_no_functions_inside(module: Path):
    assert nested_functions(module.read_text()) == []


@pytest.mark.parametrize("module", engine_modules(), ids=lambda p: p.name)
def test_engine_writes_no_file_in_place(module: Path):
    calls = [
        node.lineno
        for node in ast.walk(ast.parse(module.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("write_text", "write_bytes")
    ]
    assert calls == [], f"{module.name} lines {calls}: write through sam_repro.files (atomic_write_text etc.)"


def test_the_checks_catch_a_long_function_and_a_closure():
    """The scans themselves: the old trainer's shape (a long `_train` with a `checkpoint()` closure) fails them."""
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    source = f"def _train():\n{body}\n\n    def checkpoint():\n        return x0\n\n    return checkpoint\n"
    assert long_functions(source) == [("_train", 96)]
    assert nested_functions(source) == [("_train", "checkpoint")]
    assert nested_functions("def f():\n    return lambda: 1\n") == []
