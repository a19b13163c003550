"""Check a cluster's DDP and preemption plumbing before spending GPU hours on it; the payload of the tests too.

    srun -n 2 python scripts/slurm/ddp_check.py OUT_DIR                  # ranks, rendezvous, collectives
    SAM_TRAIN_ENTRY="python scripts/slurm/ddp_check.py OUT_DIR --steps 2000" \\
        sbatch --ntasks=2 scripts/slurm/train.sbatch                     # + stop, checkpoint, requeue, resume
    scancel --signal=USR1 --batch JOBID                                  # what SLURM sends near the time limit

Each rank joins through `init_distributed` and checks the collectives against closed forms (the sum of rank + 1
over W ranks is W(W+1)/2; the mean of the ranks is (W-1)/2), then writes OUT_DIR/rank<R>.json. With --steps it
runs a fake training loop the way the trainer does: a resumable step counter in OUT_DIR/state.json (rank 0 saves
it atomically), `StopSignal.should_stop()` after every step, `finish()` after the save. Every rank appends what
happened to OUT_DIR/events-rank<R>.jsonl (start, stop, done), which the tests read.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from sam_repro.engine.distributed import (
    all_reduce_mean_,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from sam_repro.engine.preemption import StopSignal
from sam_repro.files import atomic_write_json


def append_event(path: Path, **event) -> None:
    with path.open("a") as file:
        file.write(json.dumps(event) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=0, help="fake training steps (0: only check the collectives)")
    parser.add_argument("--step-seconds", type=float, default=0.02, help="time one fake step takes")
    args, _hydra_style_overrides = parser.parse_known_args(argv)  # train.sbatch passes its arguments through

    torch.set_num_threads(1)
    env = init_distributed(args.device)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    contribution = torch.tensor([env.rank + 1.0, 1.0], device=env.device)
    rank_sum, rank_count = all_reduce_sum(contribution).tolist()
    rank_mean = all_reduce_mean_(torch.tensor([float(env.rank)], device=env.device)).item()
    token = broadcast_object({"from_rank": env.rank, "host": socket.gethostname()})
    atomic_write_json(
        out / f"rank{env.rank}.json",
        {
            "rank": env.rank,
            "world_size": env.world_size,
            "local_rank": env.local_rank,
            "launcher": env.launcher,
            "backend": env.backend,
            "device": str(env.device),
            "master_addr": env.master_addr,
            "master_port": env.master_port,
            "host": socket.gethostname(),
            "rank_sum": rank_sum,
            "rank_count": rank_count,
            "rank_mean": rank_mean,
            "broadcast": token,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_procid": os.environ.get("SLURM_PROCID"),
        },
    )
    if args.steps <= 0:
        cleanup_distributed()
        return 0

    # ---- a fake training run that can be stopped and resumed ----
    events = out / f"events-rank{env.rank}.jsonl"
    state_path = out / "state.json"
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    start = json.loads(state_path.read_text())["step"] if state_path.exists() else 0
    start = broadcast_object(start)  # rank 0's view of the checkpoint is the one that counts
    stop = StopSignal(env)
    try:
        append_event(events, event="start", step=start, restart=restart, pid=os.getpid())
        barrier()  # every rank has its handlers in place before rank 0 announces progress
        for step in range(start + 1, args.steps + 1):
            all_reduce_sum(torch.ones(1))  # stands in for the gradient all-reduce that keeps ranks in lockstep
            time.sleep(args.step_seconds)
            if env.is_main:
                atomic_write_json(out / "progress.json", {"step": step, "restart": restart})
            if stop.should_stop():
                if env.is_main:
                    atomic_write_json(state_path, {"step": step})
                append_event(events, event="stop", step=step, signal=stop.signal_name, restart=restart)
                stop.finish()
        append_event(events, event="done", step=args.steps, restart=restart)
    finally:
        stop.restore()
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
