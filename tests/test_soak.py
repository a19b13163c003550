"""The fault soak (`scripts/soak.py`): at least 20 kill -9 at random moments (mid-write included) of SAM runs with
m-groups, signals and a full disk during checkpoint writes, damaged data, W&B failing, a non-finite loss and a rank
killed under torchrun; every fault recovered, nothing lost. Slow (minutes): `make test-all`; the dead-rank faults
alone run in the fast suite."""

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
        "rank killed in training",
        "rank killed mid-write",
    ):
        assert kind in kinds, kind
    assert report["provenance"]["git_commit"]


@pytest.mark.data
@pytest.mark.multiprocess
def test_soak_dead_rank_fault_recovers(tmp_path):
    """The soak's dead-rank faults alone (`--only dead-rank`): rank 1 of 2 killed under torchrun --max-restarts=1,
    in training and while rank 0 writes a checkpoint; both runs end with the uninterrupted 2-rank run's metrics
    and weights."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--only",
            "dead-rank",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "soak.json"),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    faults = {f["kind"]: f for f in report["faults"]}
    assert set(faults) == {"rank killed in training", "rank killed mid-write"}, report["faults"]
    assert all(f["recovered"] for f in faults.values()), report["faults"]
    assert (report["injected"], report["recovered"], report["lost"]) == (2, 2, 0)
