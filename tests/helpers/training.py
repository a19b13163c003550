"""`sam-train` as a subprocess, and what it leaves in a run directory.

Tests train with `debug=tiny` (sam_repro/configs/debug/tiny.yaml: ResNet-8 on 256 CIFAR-10 training and 500 test
images, batch 64, one thread, no W&B) plus what the test is about. Such tests are marked `data`: tests/conftest.py
skips them where CIFAR-10 is not prepared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
TINY = ["debug=tiny"]
TIMING_KEYS = {"images_per_second", "epoch_time_s"}


def env_for(runs: Path) -> dict:
    return {**os.environ, "SAM_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1"}


def train(runs: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "sam-train"), *overrides], env=env_for(runs), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sam-train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def only_run_dir(runs: Path) -> Path:
    dirs = [p.parent for p in runs.rglob("config.yaml") if p.parent.name.startswith("seed")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_jsonl(path: Path) -> list[dict]:
    """A JSON-lines file (metrics.jsonl, steps.jsonl, a rank's events), one dict a line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def read_config(run_dir: Path) -> dict:
    """The resolved config the run wrote (config.yaml), parsed."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without their timings, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def compose_config(*overrides: str):
    """The composed `train` config with `overrides`, as sam-train composes it (for in-process checks)."""
    from hydra import compose, initialize_config_module

    from sam_repro.engine.rundir import register_resolvers

    register_resolvers()
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def process_environ(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with ({} once it is gone), read from /proc (Linux)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pids(marker: str, rank: int, attempt: int = 0) -> list[int]:
    """The pids of the torchrun workers of one launch (its environment carries SAM_TEST_LAUNCH=`marker`) with this
    global rank in this restart attempt."""
    want = {"SAM_TEST_LAUNCH": marker, "RANK": str(rank), "TORCHELASTIC_RESTART_COUNT": str(attempt)}
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if want.items() <= process_environ(pid).items()]
