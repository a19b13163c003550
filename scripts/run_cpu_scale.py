"""Run a CPU-scale grid (experiment=cpu_scale by default) with a few single-thread workers, then keep each finished
run.

    python scripts/run_cpu_scale.py [--workers 2] [--seeds 0 1 2]
    python scripts/run_cpu_scale.py --seeds 0 --noise 0.4 --set trainer.m=32 --results results/cpu_scale_ablation
    python scripts/run_cpu_scale.py --experiment cpu_scale_table4 --noise 0.4 0.6 --results results/cpu_scale_table4

Runs live in runs/<experiment>/... ($SAM_RUNS_DIR moves runs/; `engine.rundir.run_dir` names each); they resume
when interrupted, and finished ones are skipped. As each run finishes,
its config.yaml, metrics.jsonl and summary.json (no checkpoint) are copied to <results>/runs/<same path>, so the
committed results grow run by run and `sam-tables results/cpu_scale` regenerates the table. SAM runs (twice the
work of SGD's) are started first, so that two workers finish the grid together.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sam_repro.engine.rundir import RunFiles, run_dir, run_path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEEP = (RunFiles.CONFIG, RunFiles.METRICS, RunFiles.SUMMARY)


def grid(seeds: list[int], noises: list[float], optimizers: list[str], extra: list[str]) -> list[list[str]]:
    """One job per seed, noise level and optimizer. An optimizer entry may carry its own overrides after commas
    (`sam,optimizer.sam_every=2`, `sgd,trainer.epochs=160`): a variant of the SAM family, or SGD at twice the epochs."""
    jobs = [
        [f"dataset.label_noise={noise}", f"optimizer={name}", f"seed={seed}", *extra, *own]
        for seed in seeds
        for noise in noises
        for name, *own in (opt.split(",") for opt in optimizers)
    ]
    return sorted(jobs, key=lambda job: "optimizer=sgd" in job)  # stable: SAM-family runs first


def run_one(experiment: str, overrides: list[str], results: Path) -> tuple[list[str], int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    cmd = [
        str(BIN / "sam-train"),
        f"experiment={experiment}",
        "trainer.threads=1",
        "trainer.progress=log",
        "trainer.log_every=1000",
        *overrides,
    ]
    rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # where sam-train (started in ROOT) trained, and the same path below <results>/runs/
    src, dst = ROOT / run_dir(overrides, experiment), results / "runs" / run_path(overrides, experiment)
    if rc == 0 and RunFiles(src).summary.exists():
        dst.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            shutil.copy2(src / name, dst / name)
    return overrides, rc, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="cpu_scale", help="the preset every run starts from (default cpu_scale)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.4, 0.0], help="label-noise rates (default 0.4 0.0)")
    ap.add_argument(
        "--optimizers",
        nargs="+",
        default=["sgd", "sam"],
        help="optimizers, each optionally with its own overrides after commas: sam,optimizer.sam_start=60",
    )
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    ap.add_argument(
        "--results",
        type=Path,
        default=ROOT / "results" / "cpu_scale",
        help="where finished runs are copied, under runs/ (default results/cpu_scale)",
    )
    args = ap.parse_args()
    jobs = grid(args.seeds, args.noise, args.optimizers, args.set)
    with ThreadPoolExecutor(args.workers) as pool:
        for overrides, rc, seconds in pool.map(lambda job: run_one(args.experiment, job, args.results.resolve()), jobs):
            print(f"{' '.join(overrides)}: exit {rc} after {seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
