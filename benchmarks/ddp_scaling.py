"""Data-parallel scaling on this machine: images/s with 1 and 2 ranks (gloo on the CPU), and what the gradient
all-reduce costs per step.

    python benchmarks/ddp_scaling.py [--model resnet20] [--batch 128] [--steps 20]

Both runs train the same model on the same global batch for the same steps (real CIFAR-10, `trainer.max_steps`),
one after the other, with one thread per rank. The all-reduce is timed separately in a 2-rank gloo group on a
buffer the size of the model's gradients (what the SAM/SGD step sends once per step). Writes
benchmarks/results/ddp_scaling.json with provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sam_repro.engine.distributed import torchrun_command
from sam_repro.engine.rundir import RunFiles

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent

ALLREDUCE = r"""
import json, os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
numel = int(sys.argv[1]); buf = torch.randn(numel)
for _ in range(3): dist.all_reduce(buf)
times = []
for _ in range(20):
    dist.barrier(); t = time.perf_counter(); dist.all_reduce(buf); times.append(time.perf_counter() - t)
if dist.get_rank() == 0:
    times.sort(); print(json.dumps({"median_s": times[len(times) // 2], "numel": numel}))
dist.destroy_process_group()
"""


def train(ranks: int, workdir: Path, args) -> dict:
    run = workdir / f"ranks{ranks}"
    run.mkdir()
    overrides = [
        f"model={args.model}",
        f"trainer.batch_size={args.batch}",
        f"trainer.max_steps={args.steps}",
        "trainer.epochs=1",
        f"dataset.train_subset={args.batch * args.steps}",
        "dataset.test_subset=1000",
        "logger.mode=disabled",
        "trainer.threads=1",
        f"optimizer={args.optimizer}",
        "hydra.run.dir=.",
        "trainer.device=cpu",
    ]  # gloo ranks on the CPU, also on a GPU node: what this benchmark measures
    cmd = (
        [str(BIN / "sam-train"), *overrides]
        if ranks == 1
        else torchrun_command(ranks, "-m", "sam_repro.train", *overrides)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=run, env=env, check=True, capture_output=True, text=True)
    return json.loads(RunFiles(run).metrics.read_text().splitlines()[-1])


def main() -> int:
    from sam_repro.engine.provenance import write_result
    from sam_repro.models import create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--optimizer", default="sam")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    numel = sum(p.numel() for p in create_model(args.model, num_classes=10).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        one, two = train(1, work, args), train(2, work, args)
        script = work / "allreduce.py"
        script.write_text(ALLREDUCE)
        out = subprocess.run(torchrun_command(2, str(script), str(numel)), capture_output=True, text=True, check=True)
        allreduce = json.loads(out.stdout.strip().splitlines()[-1])
    step_time_two = args.batch / two["images_per_second"]
    result = {
        "model": args.model,
        "optimizer": args.optimizer,
        "global_batch": args.batch,
        "steps": args.steps,
        "images_per_second": {"1_rank": one["images_per_second"], "2_ranks": two["images_per_second"]},
        "speedup_2_ranks": two["images_per_second"] / one["images_per_second"],
        "allreduce_seconds_per_step": allreduce["median_s"],
        "gradient_numel": numel,
        "allreduce_share_of_2_rank_step": allreduce["median_s"] / step_time_two,
        "note": "each rank has one thread; the machine's cores bound the speedup at their count",
    }
    write_result(RESULTS / "ddp_scaling.json", result, announce=False)
    print(
        f"1 rank {one['images_per_second']:.0f} img/s, 2 ranks {two['images_per_second']:.0f} img/s "
        f"(speedup {result['speedup_2_ranks']:.2f}); all-reduce of {numel / 1e6:.2f} M gradients "
        f"{allreduce['median_s'] * 1000:.1f} ms = {100 * result['allreduce_share_of_2_rank_step']:.1f}% of a step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
