"""`make demo`: SGD, then SAM, on real CIFAR-10 with the profile's preset, then a table of both.

    python scripts/demo.py [--profile auto|cpu|gpu] [overrides...]

Profiles: `cpu` runs `experiment=demo` (sized for a 2-core CPU), `gpu` runs `experiment=demo_gpu` (all 50,000
images, a WRN in bf16, a few minutes on one GPU); `auto` (the default, `make demo`) picks gpu where CUDA is
available and cpu elsewhere; `make demo DEMO=cpu|gpu` forces one. Each run is an ordinary `sam-train` run in
`runs/<preset>/optimizer=<name>/seed0/` (under $SAM_RUNS_DIR when it is set; `engine.rundir.run_dir` names it):
re-running the demo reports the finished runs at once, and an interrupted demo resumes where it stopped. Extra
arguments are passed to both runs as Hydra overrides (e.g. `python scripts/demo.py trainer.epochs=2`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sam_repro.engine.rundir import run_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


PROFILES = {"cpu": "demo", "gpu": "demo_gpu"}  # the preset each profile runs


def choose_profile(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("auto", *PROFILES), default="auto")
    args, extra = parser.parse_known_args(argv)
    profile = choose_profile(args.profile)
    print(f"demo: the {profile} profile (experiment={PROFILES[profile]})", flush=True)
    return run_demo(PROFILES[profile], extra)


def shown(directory: Path) -> str:
    """A run directory relative to the repository when it lies inside it (runs/...), else as it is (an absolute
    SAM_RUNS_DIR elsewhere)."""
    return str(directory.relative_to(ROOT)) if directory.is_relative_to(ROOT) else str(directory)


def run_demo(experiment: str, extra: list[str]) -> int:
    """SGD, then SAM, with `experiment=<experiment>` and the overrides; then the table."""
    results = {}
    for optimizer in ("sgd", "sam"):
        print(f"\n=== {optimizer.upper()} ===", flush=True)
        t0 = time.time()
        cmd = [str(BIN / "sam-train"), f"experiment={experiment}", f"optimizer={optimizer}", *extra]
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc != 0:
            print(f"demo: `{' '.join(cmd)}` failed with exit status {rc}", file=sys.stderr)
            return rc
        directory = ROOT / run_dir([f"optimizer={optimizer}", *extra], experiment)  # sam-train runs in ROOT
        summary = json.loads((directory / "summary.json").read_text())
        results[optimizer] = (summary, time.time() - t0, directory)

    print(f"\nSGD vs SAM on real CIFAR-10 (experiment={experiment}; the full test set of 10,000 images)\n")
    print("| optimizer | test error % | best test error % | epochs | train time (s) | images/s |")
    print("|---|---|---|---|---|---|")
    for name, (s, _, _) in results.items():
        print(
            f"| {name} | {s['test_error']:.2f} | {s['best_test_error']:.2f} | {s['epochs']} | "
            f"{s['wall_time_s']:.0f} | {s['images_per_second']:.0f} |"
        )
    diff = results["sam"][0]["test_error"] - results["sgd"][0]["test_error"]
    print(f"\nSAM - SGD: {diff:+.2f} points (one seed each; see README for what this scale shows).")
    print("Run directories:", *(shown(r[2]) for r in results.values()), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
