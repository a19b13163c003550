"""SAM's cost over SGD, measured as step-time ratios in one run on the same model and batch.

    python benchmarks/sam_overhead.py [--model resnet20] [--batch 128] [--repeats 5] [--max-repeats 15]
                                      [--steps 3] [--device cpu]

Variants: SGD, SGD with BatchNorm groups of 32 (ghost BatchNorm in one pass), plain SAM (one perturbation for the
batch), SAM with m = 32 (one per group of 32: the paper's m-sharpness), LookSAM (k = 5), ASAM, GSAM, Momentum-SAM,
and SAM's schedules (optim/sam_schedule.py): SAM every 2nd step, random SAM with p = 0.5. Late-phase SAM (SGD, then
SAM for the last quarter) costs 0.75 x SGD + 0.25 x SAM: its ratio is derived from theirs and marked so. Each
variant's forward-backward passes per step are counted from its steps (`StepStats.passes`). The floor for SAM is 2.0
(two forward-backward passes), its target 2.05; SGD with groups of 32 should cost at most 1.10 of SGD. Variants are
timed round-robin, `--steps` steps each per round, after a warm-up, and each ratio is the median over rounds of
(variant time / SGD time in the same round), so a machine that gets slower or faster during the run affects
numerator and denominator alike. After `--repeats` rounds it keeps going, up to `--max-repeats`, while the
interval around the median `sam` ratio (its rounds' quartiles over sqrt(rounds)) still straddles the target.

Prints `sam ratio X` first, then `sgd_m32 ratio X` and one `NAME ratio X` line per other variant, the number of
aten operations one step
dispatches (counted with a TorchDispatchMode, once), and SAM's own time per step (first_step, the L2 term at
w + eps and restore, timed around those calls in separate steps). Writes benchmarks/results/sam_overhead.json with
the raw times and provenance. Timings on a shared CPU are noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sam_repro.bench import device_and_thread_options, synthetic_batch, variants
from sam_repro.engine.provenance import write_result
from sam_repro.engine.step import StepContext
from sam_repro.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 2.05  # sam ratio


# Variants whose cost varies from step to step: timed over whole periods (LookSAM's k, every 2nd step) or, for the
# random schedule, over a fixed run of steps: every timed call starts again at step 0, so each round takes the same
# steps (the draws are keyed by step).
PERIOD = {"looksam_k5": 5, "sam_every2": 2, "sam_p0.5": 10}
LATE_FRACTION = 0.25  # late-phase SAM: SAM for the last quarter of training (Zhou et al., ICLR 2025)


class DispatchCount(TorchDispatchMode):
    """Counts the aten operations dispatched (each one a kernel launch, or more, on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def sam_own_time(model, opt, step, ctx, x, y, steps: int, sync) -> float:
    """Seconds per step spent in SAM's own calls (first_step, add_perturbed_weight_decay, restore)."""
    spent = [0.0]
    names = ("first_step", "add_perturbed_weight_decay", "restore")
    originals = {name: getattr(opt, name) for name in names}

    def timed_call(fn):
        def call(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spent[0] += time.perf_counter() - t0
            return out

        return call

    for name, fn in originals.items():
        setattr(opt, name, timed_call(fn))
    try:
        for _ in range(steps):
            step(model, opt, x, y, ctx)
    finally:
        for name in names:
            delattr(opt, name)  # back to the class's methods
    return spent[0] / steps


def resolved(rounds: list[float]) -> bool:
    """Whether the median of the rounds' sam ratios is clear of TARGET: the interquartile range over sqrt(n)."""
    if len(rounds) < 3:
        return False
    q1, _, q3 = statistics.quantiles(rounds, n=4)
    half = (q3 - q1) / len(rounds) ** 0.5
    return abs(statistics.median(rounds) - TARGET) > half


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="rounds at least")
    ap.add_argument("--max-repeats", type=int, default=15, help="rounds at most, while sam ratio is unresolved")
    ap.add_argument("--steps", type=int, default=3)
    device_and_thread_options(ap)
    ap.add_argument("--out", default=str(RESULTS / "sam_overhead.json"))
    args = ap.parse_args()
    device, x, y = synthetic_batch(args)

    runners = {}
    for name, (make_opt, step, group) in variants(args.batch).items():
        model = create_model(args.model, num_classes=10).to(device)
        opt = make_opt(model.parameters())
        ctx = StepContext(group_size=group)
        runners[name] = (model, opt, step, ctx)

    passes: dict[str, list[int]] = {name: [] for name in runners}

    def timed(name: str, steps: int) -> float:
        model, opt, step, ctx = runners[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        ctx.step = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            passes[name].append(step(model, opt, x, y, ctx).passes)
            ctx.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    for name in runners:  # warm-up: allocator, kernels, LookSAM's first (full) step
        timed(name, 2)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for counted in passes.values():
        counted.clear()  # counted from here on: whole periods only
    while True:
        for name in runners:
            # periodic costs (LookSAM, every 2nd step, random SAM): whole periods, so every round sees the same mix
            times[name].append(timed(name, PERIOD.get(name, 1) * args.steps))
        sam_rounds = [t / s for t, s in zip(times["sam"], times["sgd"])]
        done = len(sam_rounds) >= args.repeats and resolved(sam_rounds)
        if done or len(sam_rounds) >= max(args.repeats, args.max_repeats):
            break
    ratios = {name: statistics.median(t / s for t, s in zip(times[name], times["sgd"])) for name in runners}
    late = f"late_sam_{LATE_FRACTION:g}"
    ratios[late] = (1 - LATE_FRACTION) * ratios["sgd"] + LATE_FRACTION * ratios["sam"]  # derived, not timed
    passes_per_step = {name: sum(p) / len(p) for name, p in passes.items()}
    passes_per_step[late] = (1 - LATE_FRACTION) * 1 + LATE_FRACTION * 2

    ops = {}
    for name, (model, opt, step, ctx) in runners.items():
        if name in PERIOD:
            continue  # a SAM or a plain step, depending on where its period stands
        with DispatchCount() as counter:
            step(model, opt, x, y, ctx)
        ops[name] = counter.count

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    own = {name: sam_own_time(*runners[name], x, y, args.steps, sync) for name in ("sam", "sam_m32")}

    print(f"sam ratio {ratios['sam']:.2f}")
    print(f"sgd_m32 ratio {ratios['sgd_m32']:.2f}")
    for name in ratios:
        if name not in ("sgd", "sam", "sgd_m32"):
            print(f"{name} ratio {ratios[name]:.2f}{' (derived: 0.75 sgd + 0.25 sam)' if name == late else ''}")
    print("forward-backward passes per step: " + ", ".join(f"{k} {v:g}" for k, v in passes_per_step.items()))
    verdict = "resolved" if resolved(sam_rounds) else "not resolved"
    print(f"(sam ratio against {TARGET}: {verdict} after {len(sam_rounds)} rounds)")
    print("dispatched ops per step: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
    sam_step_time = statistics.median(times["sam"])
    print(
        "SAM's own time per step: "
        + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in own.items())
        + f" (sam step {sam_step_time * 1000:.0f} ms)"
    )
    print(f"(sgd {statistics.median(times['sgd']) * 1000:.0f} ms/step, {args.model}, batch {args.batch}, {device})")
    result = {
        "what": "step time over SGD's, median over round-robin rounds",
        "model": args.model,
        "batch": args.batch,
        "device": str(device),
        "repeats": len(sam_rounds),
        "sam_ratio_target": TARGET,
        "sam_ratio_resolved": resolved(sam_rounds),
        "dispatched_ops_per_step": ops,
        "sam_own_seconds_per_step": own,
        "threads": torch.get_num_threads(),
        "steps_per_round": args.steps,
        "ratios": ratios,
        "derived_ratios": [late],
        "passes_per_step": passes_per_step,
        "seconds_per_step": {k: v for k, v in times.items()},
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
