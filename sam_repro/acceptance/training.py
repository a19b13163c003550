"""A short SGD-vs-SAM training on real CIFAR-10 through the real `sam-train`: the Hydra config users compose, the
trainer's own data path (`dataset.export`, or the prepared cache), checkpoints and metrics; nothing stood in for.

Each run is `sam-train` in a subprocess (`python -m sam_repro.train`, so a checkout that is not installed runs it too)
with logging to files only (`logger=none`). The recipe: bf16, Nesterov SGD with L2 weight decay, cosine, clipping at
5, m = 32 (the paper's, trainer defaults otherwise). The number of epochs comes from a measured one-epoch SAM probe
(its start-up and its epoch time, both from the probe's own run) so that SGD and SAM together fit the time given.
Needs hydra-core and omegaconf.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from sam_repro.engine.rundir import RunFiles
from sam_repro.errors import SamReproError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ("model=resnet8", "trainer.batch_size=64", "dataset.train_subset=256", "dataset.test_subset=200")
FULL = ("model=wrn16_4", "trainer.batch_size=256", "trainer.channels_last=true")
MAX_RUN_S = 3600.0  # a sam-train run that takes longer has hung (a smoke run's budget may be "unlimited")
SGD_PER_SAM = 0.55  # an SGD epoch over a SAM epoch (one forward-backward pass of two, plus the evaluation)


def find_cifar10(data: str | None) -> tuple[list[str], str, int] | None:
    """The overrides that give `sam-train` CIFAR-10, where it comes from and its number of test images: `data` (an
    export, read and verified here first), else the prepared cache, else None."""
    from sam_repro.data.sources import cache_path

    if data:
        from sam_repro.data.export import read_export

        _, meta = read_export(Path(data))
        path = Path(data).resolve()
        source = f"{data} ({meta['num_train']} training, {meta['num_test']} test images)"
        return [f"dataset.export={path}"], source, int(meta["num_test"])
    if cache_path("cifar10").exists():
        return [], f"{cache_path('cifar10')} (the prepared cache)", 10_000
    return None


def sam_train(overrides: list[str], run_root: Path, timeout: float) -> tuple[dict, list[dict]]:
    """One `sam-train` run under `run_root`: (summary.json, metrics.jsonl rows). SamReproError with the run's last
    lines if it fails."""
    env = dict(os.environ, SAM_RUNS_DIR=str(run_root))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sam_repro.train", *overrides],
            capture_output=True,
            text=True,
            env=env,
            timeout=min(timeout, MAX_RUN_S),
            cwd=run_root.parent,
        )
    except subprocess.TimeoutExpired:
        raise SamReproError(
            f"sam-train {' '.join(overrides)} did not finish within {min(timeout, MAX_RUN_S):.0f} s"
        ) from None
    summaries = list(run_root.rglob(RunFiles.SUMMARY))
    if proc.returncode != 0 or len(summaries) != 1:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SamReproError(f"sam-train {' '.join(overrides)} failed (exit {proc.returncode}): {tail[:500]}")
    files = RunFiles(summaries[0].parent)
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines() if line.strip()]
    return json.loads(files.summary.read_text()), [r for r in rows if "test_error" in r]


def short_training(
    data: list[str], num_test: int, device: str, seconds: float, smoke: bool, workdir: Path, log=print
) -> dict:
    """SGD, then SAM, for the same number of epochs; returns the per-epoch test errors and the timing."""
    base = [
        *(SMOKE if smoke else FULL),
        *data,
        "trainer.precision=bf16",
        "trainer.m=32",
        "trainer.grad_clip=5.0",
        f"trainer.device={device}",
        "trainer.progress=off",
        "logger=none",
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    probe = None
    if smoke:
        epochs = 1
    else:
        start = time.perf_counter()
        # A probe that takes over a third of the time leaves no room for two runs: stop it there.
        _, rows = sam_train([*base, "optimizer=sam", "trainer.epochs=1"], workdir / "probe", timeout=seconds / 3)
        wall = time.perf_counter() - start
        epoch_s = rows[-1]["epoch_time_s"]
        startup_s = max(0.0, wall - epoch_s)
        left = seconds - wall - 2 * startup_s
        epochs = max(1, min(30, math.floor(left / ((1 + SGD_PER_SAM) * epoch_s))))
        probe = {"wall_s": round(wall, 1), "sam_epoch_s": round(epoch_s, 2), "startup_s": round(startup_s, 1)}
        log(f"real data: probe: SAM epoch {epoch_s:.1f} s, start-up {startup_s:.0f} s: {epochs} epochs fit")
    runs = {}
    for name in ("sgd", "sam"):
        start = time.perf_counter()
        summary, rows = sam_train(
            [*base, f"optimizer={name}", f"trainer.epochs={epochs}"], workdir / name, timeout=max(60.0, seconds)
        )
        errors = [round(float(r["test_error"]), 2) for r in rows]
        for epoch, error in enumerate(errors, 1):
            log(f"real data: {name} epoch {epoch}/{epochs}: test error {error:.2f}%")
        runs[name] = {
            "test_error": errors,
            "seconds": round(time.perf_counter() - start, 1),
            "status": summary["status"],
        }
        num_train = summary["num_train"]
    return {
        "model": (SMOKE if smoke else FULL)[0].split("=")[1],
        "precision": "bf16",
        "batch": 64 if smoke else 256,
        "m": 32,
        "epochs": epochs,
        "num_train": num_train,
        "num_test": min(num_test, 200) if smoke else num_test,
        "probe": probe,
        "runs": runs,
        "command": "sam-train " + " ".join(base),
        "sam_minus_sgd": round(runs["sam"]["test_error"][-1] - runs["sgd"]["test_error"][-1], 2),
    }
