"""What `trainer.compile=true` buys: step time of the eager model over the torch.compile'd one, in one run.

    python benchmarks/compile_speedup.py [--model resnet20] [--batch 128] [--rounds 5] [--steps 3]
                                         [--backend inductor] [--precision fp32|bf16] [--device cpu]

Variants: SGD, plain SAM (m = the batch) and SAM with m = 32, each with the model as it is and with
`torch.compile(model)` (what the trainer does with `trainer.compile=true`: the model's forward is compiled, the step
stays eager). The compiled models are warmed up first (the time to compile is reported separately), then eager and
compiled are timed round-robin, `--steps` steps each per round; each speed-up is the median over rounds of
(eager time / compiled time in the same round), so a machine that gets slower during the run affects both alike.
Dynamo's counters give the number of graphs compiled per variant (the trainer's test holds it at one for SGD and
two for SAM). Prints `compile speedup <variant> X` per variant, and writes benchmarks/results/compile_speedup.json
with the raw times and provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from sam_repro import bench
from sam_repro.bench import device_and_thread_options, synthetic_batch
from sam_repro.engine.provenance import write_result
from sam_repro.engine.step import StepContext
from sam_repro.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"


def variants(batch: int) -> dict:
    """sam_overhead's SGD, SAM and SAM m = 32 (`sam_repro.bench.variants`: same optimizers and hyperparameters)."""
    return {name: v for name, v in bench.variants(batch).items() if name in ("sgd", "sam", "sam_m32")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant and round")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor, as the trainer)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    device_and_thread_options(ap)
    ap.add_argument("--out", default=str(RESULTS / "compile_speedup.json"))
    args = ap.parse_args(argv)
    device, x, y = synthetic_batch(args)
    if args.precision == "bf16":

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    runners, compile_seconds, graphs = {}, {}, {}
    for name, (make_opt, step, group) in variants(args.batch).items():
        for compiled in (False, True):
            torch.manual_seed(0)
            model = create_model(args.model, num_classes=10).to(device)
            opt = make_opt(model.parameters())
            ctx = StepContext(group_size=group, autocast=autocast)
            run_model = torch.compile(model, backend=args.backend) if compiled else model
            key = f"{name}_compiled" if compiled else name
            torch._dynamo.reset()
            counters.clear()
            sync()
            t0 = time.perf_counter()
            for _ in range(3):  # warm-up; for the compiled model: every graph it needs (SAM: two)
                step(run_model, opt, x, y, ctx)
            sync()
            if compiled:
                compile_seconds[name] = time.perf_counter() - t0
                graphs[name] = counters["stats"]["unique_graphs"]
            runners[key] = (run_model, opt, step, ctx)

    def timed(key: str) -> float:
        model, opt, step, ctx = runners[key]
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(model, opt, x, y, ctx)
        sync()
        return (time.perf_counter() - t0) / args.steps

    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(args.rounds):
        for key in runners:
            times[key].append(timed(key))
    speedups = {
        name: statistics.median(e / c for e, c in zip(times[name], times[f"{name}_compiled"]))
        for name in variants(args.batch)
    }
    for name, s in speedups.items():
        print(f"compile speedup {name} {s:.2f}")
    print(
        "graphs compiled: "
        + ", ".join(f"{k} {v}" for k, v in graphs.items())
        + "; time to compile (warm-up): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in compile_seconds.items())
    )
    print(
        "(eager ms/step: "
        + ", ".join(f"{k} {statistics.median(times[k]) * 1000:.0f}" for k in variants(args.batch))
        + f"; {args.model}, batch {args.batch}, {args.precision}, backend {args.backend}, {device},"
        + f" {torch.get_num_threads()} threads, {args.rounds} rounds)"
    )
    result = {
        "what": "eager step time over torch.compile'd step time, median over round-robin rounds",
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "backend": args.backend,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "speedups": speedups,
        "graphs": graphs,
        "compile_seconds": compile_seconds,
        "seconds_per_step": times,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
