"""`sam-eval`: top-1 / top-5 test error (percent) of a trained run, from its checkpoint.

    sam-eval RUN [RUN ...] [--split test|train] [--batch-size 1000] [--device auto] [--data-root DIR] [--json]

RUN is a run directory (its `checkpoints/last.pt`) or a `.pt` checkpoint. The network is rebuilt from the config
stored with the weights and evaluated in eval mode (BatchNorm running statistics) on the whole split, as the trainer
measures `test_error`. Prints one line per run (`--json`: one JSON object per line). Errors: one line `error: ...`,
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from sam_repro.analysis.loading import evaluate, load_split, open_run
from sam_repro.engine.compat import set_tf32
from sam_repro.engine.distributed import resolve_device
from sam_repro.errors import ConfigError, SamReproError


def evaluate_run(
    path: str,
    split: str = "test",
    batch_size: int = 1000,
    device: str = "auto",
    data_root: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss and top-1/top-5 error (percent) of the run at `path` on the whole `split`, in IEEE float32."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch_size})")
    resolved = resolve_device(device, option="--device")
    set_tf32(False)
    run = open_run(path, resolved)
    data = load_split(run.cfg, split, root=data_root).to(resolved)
    batches = tqdm(
        data.batches(batch_size),
        total=math.ceil(len(data) / batch_size),
        desc=f"eval {split}",
        disable=not progress,
        leave=False,
    )
    with torch.inference_mode():
        result = evaluate(run.model, batches)
    return {
        "run": str(path),
        "checkpoint": str(run.checkpoint),
        "epoch": run.epoch,
        "dataset": str(run.cfg.dataset.name),
        "split": split,
        "num_examples": result.num_examples,
        "loss": result.loss,
        "top1_error": result.top1_error,
        "top5_error": result.top5_error,
        "device": str(resolved),
    }


def format_result(record: dict[str, Any]) -> str:
    """One human-readable line, e.g. `runs/x: top-1 error 3.21%  top-5 error 0.11%  (test, 10000 images, ...)`."""
    top5 = f"  top-5 error {record['top5_error']:.2f}%" if record["top5_error"] is not None else ""
    epoch = f", epoch {record['epoch']}" if record["epoch"] is not None else ""
    return (
        f"{record['run']}: top-1 error {record['top1_error']:.2f}%{top5}  ({record['dataset']} {record['split']}, "
        f"{record['num_examples']} images, loss {record['loss']:.4f}{epoch})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or .pt checkpoints")
    parser.add_argument("--split", default="test", choices=("test", "train"), help="data split (default: test)")
    parser.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size (default: 1000)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--data-root", default=None, help="override dataset.root stored in the run's config")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run instead of a line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in args.runs:
            record = evaluate_run(
                path, args.split, args.batch_size, args.device, args.data_root, progress=not args.no_progress
            )
            print(json.dumps(record) if args.json else format_result(record), flush=True)
    except SamReproError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
