"""The tiers' lists in tests/conftest.py stay true: every test they name exists, and every test that launches a
process (a `subprocess` call, or `helpers.training.train`, directly or through a function of its module) is in
`E2E`, so that a new one cannot slip into `make test`'s fast tier."""

from __future__ import annotations

import ast
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent
SPAWN = {("subprocess", name) for name in ("run", "Popen", "check_output", "check_call", "call")}


def launching_tests(path: Path) -> set[str]:
    """The test functions of `path` that launch a process, by reading its code."""
    tree = ast.parse(path.read_text())
    spawners = {  # names imported from the helpers that run sam-train as a subprocess
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "helpers.training"
        for alias in node.names
        if alias.name == "train"
    }
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    calls = {name: set(map(_callee, ast.walk(fn))) - {None} for name, fn in functions.items()}
    launching: set[str] = set()
    while True:
        found = {
            name
            for name, called in calls.items()
            if called & SPAWN or any(not owner and callee in spawners | launching for owner, callee in called)
        }
        if found <= launching:
            return {name for name in launching if name.startswith("test_")}
        launching |= found


def _callee(node: ast.AST) -> tuple[str, str] | None:
    if not isinstance(node, ast.Call):
        return None
    if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
        return node.func.value.id, node.func.attr
    return ("", node.func.id) if isinstance(node.func, ast.Name) else None


def test_every_listed_test_exists():
    for table in (conftest.E2E, conftest.CONTRACT):
        for module, names in table.items():
            path = TESTS / module
            assert path.is_file(), f"tests/conftest.py lists {module}, which does not exist"
            if names != conftest.ALL:
                text = path.read_text()
                missing = sorted(name for name in names if f"def {name}(" not in text)
                assert not missing, f"tests/conftest.py lists tests that {module} does not define: {missing}"


def test_every_test_that_launches_a_process_is_e2e():
    unlisted = {}
    for path in sorted(TESTS.glob("test_*.py")):
        listed = conftest.E2E.get(path.name, set())
        if listed != conftest.ALL:
            names = sorted(launching_tests(path) - set(listed))
            if names:
                unlisted[path.name] = names
    assert not unlisted, f"launch processes but are not in tests/conftest.py's E2E list: {unlisted}"


def test_the_reader_sees_a_launch_through_a_helper(tmp_path):
    module = tmp_path / "test_example.py"
    module.write_text(
        "import subprocess\n"
        "from helpers.training import train\n"
        "def run(): return subprocess.run(['true'])\n"
        "def test_direct(): run()\n"
        "def test_trains(tmp_path): train(tmp_path)\n"
        "def test_pure(): assert 1 + 1 == 2\n"
    )
    assert launching_tests(module) == {"test_direct", "test_trains"}
