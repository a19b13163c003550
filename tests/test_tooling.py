"""The project's own tooling: `make help` documents every target, CI stops on a lint failure, and the licence the
package declares is the one it ships."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_documents_every_target():
    makefile = (REPOSITORY / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE).group(1).split()
    result = subprocess.run(["make", "-s", "help"], cwd=REPOSITORY, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    documented = dict(re.findall(r"^make (\S+) +(\S.*)$", result.stdout, re.MULTILINE))
    assert sorted(documented) == sorted(phony)  # every target listed once, nothing listed that is not a target
    assert {"lint", "format", "test", "demo"} <= set(documented)


def test_ci_stops_when_lint_fails(tmp_path: Path):
    """.ci/run with a `make` whose lint fails: CI exits non-zero and never gets to the tests.

    Stand-ins record every command CI starts: `make` (lint fails), and `dpkg` and `bash` (the package install and
    the cluster start-up), so that even a CI script that went on would change nothing on this machine."""
    calls = tmp_path / "calls.log"
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    for name, status in (("make", '[ "$1" != lint ]'), ("dpkg", "true"), ("bash", "false")):
        path = stand_ins / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n{status}\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["/bin/bash", str(REPOSITORY / ".ci" / "run")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert calls.read_text().splitlines() == ["make lint"]
    assert "ci: make lint failed" in result.stderr


def test_the_declared_licence_is_the_shipped_one():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    text = (REPOSITORY / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    # An SPDX `license` string and `license-files` need setuptools >= 77 (PEP 639).
    (setuptools,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert re.fullmatch(r"setuptools>=(\d+)", setuptools) and int(setuptools.split(">=")[1]) >= 77
