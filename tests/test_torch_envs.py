"""scripts/torch_envs.py picks an interpreter that runs: a pyenv shim for a version that is installed but not selected
(`pyenv: python3.12: command not found`, exit 127) is passed over for pyenv's own copy, as CI's machine needs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import torch_envs  # noqa: E402


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def pyenv_with_a_dead_shim(tmp_path, monkeypatch):
    shims = tmp_path / "shims"
    _script(shims / "python3.12", "echo 'pyenv: python3.12: command not found' >&2; exit 127")
    working = _script(tmp_path / "versions" / "3.12.1" / "bin" / "python3.12", f'exec "{sys.executable}" "$@"')
    _script(tmp_path / "versions" / "3.12.9" / "bin" / "python3.12", "exit 1")  # newer, but broken
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))
    monkeypatch.delenv("SAM_PYTHON312", raising=False)
    return working


def test_a_shim_that_does_not_run_is_passed_over_for_the_newest_copy_that_does(pyenv_with_a_dead_shim):
    assert torch_envs.find_python("3.12") == pyenv_with_a_dead_shim


def test_no_copy_that_runs_is_one_error_naming_the_variable(pyenv_with_a_dead_shim, tmp_path):
    pyenv_with_a_dead_shim.unlink()
    with pytest.raises(torch_envs.EnvError, match="SAM_PYTHON312"):
        torch_envs.find_python("3.12")


def test_an_override_that_does_not_run_is_named(monkeypatch, tmp_path):
    broken = _script(tmp_path / "python", "exit 127")
    monkeypatch.setenv("SAM_PYTHON312", str(broken))
    with pytest.raises(torch_envs.EnvError, match=f"SAM_PYTHON312={broken}"):
        torch_envs.find_python("3.12")
