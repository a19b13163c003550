"""What keeping freed memory in the process (`engine.backends.keep_freed_memory`, glibc) does to SGD and SAM steps.

    python benchmarks/allocator.py [--model resnet20] [--batch 128] [--rounds 12] [--threads 2]

Two child processes, one after the other, each timing SGD and SAM round-robin on the same batch (the median over
rounds of SAM's time over SGD's in the same round) and counting the minor page faults per step: `default`, glibc as
it comes (the child sets GLIBC_TUNABLES to nothing, which `keep_freed_memory` takes as the environment's choice and
glibc as no tuning), and `kept`, with `keep_freed_memory()` as the trainer calls it. Prints one line per arm and
`sam ratio default X kept Y`; writes benchmarks/results/allocator.json with provenance. Timings on a shared CPU are
noisy; the page faults are not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(args: argparse.Namespace) -> dict:
    """One arm, in this process: SGD and SAM steps round-robin; times, ratios and page faults per step."""
    import torch

    from sam_repro.bench import variants
    from sam_repro.engine.backends import keep_freed_memory
    from sam_repro.engine.step import StepContext
    from sam_repro.models import create_model

    kept = keep_freed_memory() if args.arm == "kept" else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    runs = {}
    for name in ("sgd", "sam"):
        make_optimizer, step, group = variants(args.batch)[name]
        model = create_model(args.model, num_classes=10)
        runs[name] = (model, make_optimizer(model.parameters()), step, StepContext(group_size=group))
    for model, optimizer, step, ctx in runs.values():
        for _ in range(3):  # warm-up
            step(model, optimizer, x, y, ctx)
    times: dict[str, list[float]] = {name: [] for name in runs}
    faults = dict.fromkeys(runs, 0)
    for _ in range(args.rounds):
        for name, (model, optimizer, step, ctx) in runs.items():
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer, x, y, ctx)
            times[name].append((time.perf_counter() - start) / args.steps)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    ratios = sorted(a / b for a, b in zip(times["sam"], times["sgd"]))
    return {
        "arm": args.arm,
        "applied": kept,
        "ms_per_step": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "sam_ratio": statistics.median(ratios),
        "sam_ratio_quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
        "page_faults_per_step": {name: n / (args.rounds * args.steps) for name, n in faults.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arm", choices=("default", "kept"), help=argparse.SUPPRESS)  # a child's arm
    ap.add_argument("--out", type=Path, default=RESULTS / "allocator.json")
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(child(args)))
        return 0
    arms = {}
    for arm in ("default", "kept"):
        env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
        if arm == "default":
            env["GLIBC_TUNABLES"] = ""
        command = [sys.executable, __file__, *sys.argv[1:], "--arm", arm]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        arms[arm] = json.loads(result.stdout.strip().splitlines()[-1])
        a = arms[arm]
        ms, faults, (low, high) = a["ms_per_step"], a["page_faults_per_step"], a["sam_ratio_quartiles"]
        print(
            f"{arm}: sgd {ms['sgd']:.0f} ms, sam {ms['sam']:.0f} ms, ratio {a['sam_ratio']:.3f} (quartiles "
            f"{low:.3f}-{high:.3f}), page faults per step sgd {faults['sgd']:.0f}, sam {faults['sam']:.0f}"
        )
    print(f"sam ratio default {arms['default']['sam_ratio']:.2f} kept {arms['kept']['sam_ratio']:.2f}")
    from sam_repro.engine.provenance import write_result

    settings = {k: v for k, v in vars(args).items() if k not in ("arm", "out")}
    write_result(args.out, {"benchmark": "allocator", "settings": settings, "arms": arms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
