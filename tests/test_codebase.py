"""The package's shape, checked on its source: every function in sam_repro/ fits on a screen (at most 80 lines),
none defines a function inside itself (a closure over a loop's state: the trainer passes its state, one `_Run`, to
each piece explicitly; a lambda, a one-expression adapter, is fine), and no module replaces a file with
`Path.write_text`/`write_bytes` (files are written atomically through sam_repro/files.py).

The exceptions are listed below, each with its reason; fixing the code is preferred to adding one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sam_repro"
MAX_LINES = 80
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)

# "<module relative to sam_repro/>::<function>": why it may break the rule.
LONG_ALLOWED = {
    # The GPU acceptance run's driver: its budgeted parts (matmul probe, correctness, throughput, cost, real data)
    # in one sequence over one report. Splitting it as the trainer is split (a state object and one function per
    # part) is the fix; it waits for a session with a GPU to run the whole check on (its CUDA branches are not
    # exercised by the CPU smoke run).
    "acceptance/run.py::_main": "the GPU check's driver, see above",
}
NESTED_ALLOWED = {
    # save, part_failed, measure and flops close over _main's report, budget and rows: they go with the split above.
    "acceptance/run.py::_main": "the GPU check's driver, see above",
}


def package_modules() -> list[Path]:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "engine" / "trainer.py" in modules
    return modules


def module_id(module: Path) -> str:
    return module.relative_to(PACKAGE).as_posix()


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


def in_place_writes(source: str) -> list[int]:
    """The lines that call `.write_text` or `.write_bytes`."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("write_text", "write_bytes")
    ]


@pytest.mark.parametrize("module", package_modules(), ids=module_id)
def test_functions_are_at_most_80_lines(module: Path):
    found = [
        (name, n)
        for name, n in long_functions(module.read_text())
        if f"{module_id(module)}::{name}" not in LONG_ALLOWED
    ]
    assert found == []


@pytest.mark.parametrize("module", package_modules(), ids=module_id)
def test_functions_define_no_functions_inside(module: Path):
    found = [
        (outer, inner)
        for outer, inner in nested_functions(module.read_text())
        if f"{module_id(module)}::{outer}" not in NESTED_ALLOWED
    ]
    assert found == []


@pytest.mark.parametrize("module", package_modules(), ids=module_id)
def test_no_module_writes_a_file_in_place(module: Path):
    calls = in_place_writes(module.read_text())
    assert calls == [], f"{module_id(module)} lines {calls}: write through sam_repro.files (atomic_write_text etc.)"


@pytest.mark.parametrize(
    "allowed, check", [(LONG_ALLOWED, long_functions), (NESTED_ALLOWED, nested_functions)], ids=["long", "nested"]
)
def test_every_exception_is_still_needed(allowed, check):
    """An exception whose function has been fixed (or renamed, or removed) goes from the list."""
    for entry in allowed:
        path, name = entry.split("::")
        assert any(found[0] == name for found in check((PACKAGE / path).read_text())), f"{entry} is no exception now"


def test_the_checks_catch_a_long_function_a_closure_and_an_in_place_write():
    """The scans themselves: the old trainer's shape (a long `_train` with a `checkpoint()` closure) fails them."""
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    source = f"def _train():\n{body}\n\n    def checkpoint():\n        return x0\n\n    return checkpoint\n"
    assert long_functions(source) == [("_train", 96)]
    assert nested_functions(source) == [("_train", "checkpoint")]
    assert nested_functions("def f():\n    return lambda: 1\n") == []
    assert in_place_writes("from pathlib import Path\n\nPath('x').write_text('y')\n") == [3]
