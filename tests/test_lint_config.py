"""The lint tools agree with each other: pre-commit runs the ruff that `make lint` pins, with the same checks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 reads TOML with tomli")

ROOT = Path(__file__).resolve().parents[1]


def dev_pin(package: str) -> str:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (pin,) = [re.fullmatch(rf"{package}==(\S+)", spec) for spec in dev if spec.startswith(package)]
    assert pin is not None, f"{package} is not pinned with == in the dev extra"
    return pin.group(1)


def test_pre_commit_runs_the_pinned_ruff_checking_without_changing():
    (repo,) = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
    assert repo["repo"].endswith("/ruff-pre-commit") and repo["rev"] == "v" + dev_pin("ruff")
    hooks = {hook["id"]: hook.get("args", []) for hook in repo["hooks"]}
    assert hooks == {"ruff-check": [], "ruff-format": ["--check"]}  # make lint: `ruff check .`, `ruff format --check .`


def test_make_lint_runs_ruff_and_mypy_over_the_configured_files():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check ." in recipe and "ruff format --check ." in recipe and "/mypy" in recipe
    dev_pin("mypy")
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert {"sam_repro/optim", "sam_repro/engine/step.py", "sam_repro/data/loader.py"} <= set(files)
    assert all((ROOT / f).exists() for f in files)
