"""The fault soak (`scripts/soak.py`): at least 20 kill -9 at random moments (mid-write included) of SAM runs with
m-groups, signals and a full disk during checkpoint writes, damaged data, W&B failing and a non-finite loss; every
fault recovered, nothing lost. Slow (minutes): `make test-all`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.data
def test_soak_recovers_from_every_fault(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--kills",
            "20",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "soak.json"),
        ],
        capture_output=True,
        text=True,
        timeout=5400,
    )
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"soak: (\d+) faults injected, (\d+) recovered, (\d+) lost", last)
    assert proc.returncode == 0 and match, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    injected, recovered, lost = map(int, match.groups())
    assert (injected, recovered, lost) == (report["injected"], report["recovered"], 0) and injected == recovered
    kinds = [f["kind"] for f in report["faults"]]
    assert sum(k.startswith("kill -9") for k in kinds) >= 20 and "kill -9 mid-write" in kinds
    for kind in (
        "SIGTERM mid-write",
        "SIGUSR1 mid-write",
        "full disk mid-write",
        "W&B fails mid-run",
        "non-finite loss",
    ):
        assert kind in kinds, kind
    assert report["provenance"]["git_commit"]
