"""SAM's cost over SGD, measured as step-time ratios in one run on the same model and batch.

    python benchmarks/sam_overhead.py [--model resnet20] [--batch 128] [--repeats 5] [--steps 3] [--device cpu]

Variants: SGD, plain SAM (one perturbation for the batch), SAM with m = 32 (one per group of 32: the paper's
m-sharpness), LookSAM (k = 5). The floor for SAM is 2.0 (two forward-backward passes). Variants are timed
round-robin, `--repeats` rounds of `--steps` steps each, after a warm-up, and each ratio is the median over rounds
of (variant time / SGD time in the same round), so a machine that gets slower or faster during the run affects
numerator and denominator alike. Prints one line per variant, plain SAM first (`sam ratio 2.03`), and writes
benchmarks/results/sam_overhead.json with the raw times and provenance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sam_repro.engine.distributed import resolve_device
from sam_repro.engine.provenance import provenance
from sam_repro.engine.step import StepContext, looksam_step, sam_step, sgd_step
from sam_repro.files import atomic_write_json
from sam_repro.models import create_model
from sam_repro.optim.looksam import LookSAM
from sam_repro.optim.sam import SAM

RESULTS = Path(__file__).resolve().parent / "results"


def variants(batch: int):
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return {
        "sgd": (lambda params: _sgd(params, kw), sgd_step, batch),
        "sam": (lambda params: SAM(params, torch.optim.SGD, rho=0.05, **kw), sam_step, batch),
        "sam_m32": (lambda params: SAM(params, torch.optim.SGD, rho=0.05, **kw), sam_step, 32),
        "looksam_k5": (lambda params: LookSAM(params, torch.optim.SGD, rho=0.05, k=5, **kw), looksam_step, batch),
    }


def _sgd(params, kw):
    kw = dict(kw)
    wd = kw.pop("weight_decay")
    opt = torch.optim.SGD(params, **kw)
    for g in opt.param_groups:
        g["l2_weight_decay"] = wd
    return opt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "sam_overhead.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, option="--device")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    runners = {}
    for name, (make_opt, step, group) in variants(args.batch).items():
        model = create_model(args.model, num_classes=10).to(device)
        opt = make_opt(model.parameters())
        ctx = StepContext(group_size=group)
        runners[name] = (model, opt, step, ctx)

    def timed(name: str, steps: int) -> float:
        model, opt, step, ctx = runners[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(model, opt, x, y, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    for name in runners:  # warm-up: allocator, kernels, LookSAM's first (full) step
        timed(name, 2)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name in runners:
            # LookSAM's cost is periodic (k = 5): time whole periods so every round sees the same mix.
            times[name].append(timed(name, 5 * args.steps if name.startswith("looksam") else args.steps))
    ratios = {name: statistics.median(t / s for t, s in zip(times[name], times["sgd"])) for name in runners}

    for name in ("sam", "sam_m32", "looksam_k5"):
        print(f"{name} ratio {ratios[name]:.2f}")
    print(f"(sgd {statistics.median(times['sgd']) * 1000:.0f} ms/step, {args.model}, batch {args.batch}, {device})")
    result = {
        "what": "step time over SGD's, median over round-robin rounds",
        "model": args.model,
        "batch": args.batch,
        "device": str(device),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "steps_per_round": args.steps,
        "ratios": ratios,
        "seconds_per_step": {k: v for k, v in times.items()},
        "provenance": provenance(),
    }
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
