"""`sam-eval`: top-1 / top-5 test error (percent) of a trained run, from its checkpoint.

    sam-eval RUN [RUN ...] [--split test|train] [--batch-size 1000] [--device auto] [--data-root DIR] [--json]

RUN is a run directory (its `checkpoints/last.pt`) or a `.pt` checkpoint. The network is rebuilt from the config
stored with the weights and evaluated in eval mode (BatchNorm running statistics) on the images the trainer measured
`test_error` on: the test split, or its first `dataset.test_subset` images where the run set one (`--full-test`: the
whole split); `--split train` is the training set as the run saw it. Prints one line per run naming the split and
the number of images (`--json`: one JSON object per line). Progress: bars on a terminal, none otherwise
(`--progress`). Errors: one line `error: ...`, exit status 2.
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

from sam_repro.analysis.loading import evaluate_batches, load_split, open_run
from sam_repro.engine.compat import set_tf32
from sam_repro.engine.distributed import resolve_device
from sam_repro.engine.loggers import PROGRESS_MODES, progress_mode
from sam_repro.errors import ConfigError, SamReproError


def evaluate_run(
    path: str,
    split: str = "test",
    batch_size: int = 1000,
    device: str = "auto",
    data_root: str | None = None,
    progress: bool | str = "auto",
    full_test: bool = False,
) -> dict[str, Any]:
    """Loss and top-1/top-5 error (percent) of the run at `path` on `split`, in IEEE float32: the test images the run
    measured (its `dataset.test_subset`, unless `full_test`), or its training set. `progress`: a mode of
    `engine.loggers.progress_mode` (a bar only where it resolves to "bar") or a bool."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch_size})")
    resolved = resolve_device(device, option="--device")
    set_tf32(False)
    run = open_run(path, resolved)
    data = load_split(run.cfg, split, root=data_root, run_test_subset=not full_test).to(resolved)
    test_subset = run.cfg.dataset.get("test_subset") if split == "test" else None
    bar = progress_mode(progress) == "bar" if isinstance(progress, str) else progress
    batches = tqdm(
        data.batches(batch_size),
        total=math.ceil(len(data) / batch_size),
        desc=f"eval {split}",
        disable=not bar,
        leave=False,
    )
    with torch.inference_mode():
        result = evaluate_batches(run.model, batches)
    return {
        "run": str(path),
        "checkpoint": str(run.checkpoint),
        "epoch": run.epoch,
        "dataset": str(run.cfg.dataset.name),
        "split": split,
        "num_examples": result.num_examples,
        # the run measured only the first N test images; None: it measured the whole split
        "run_test_subset": int(test_subset) if test_subset is not None else None,
        "full_test": bool(full_test),
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
        f"{record['run']}: top-1 error {record['top1_error']:.2f}%{top5}  ({record['dataset']} {_measured(record)}, "
        f"loss {record['loss']:.4f}{epoch})"
    )


def _measured(record: dict[str, Any]) -> str:
    """Which images: `test split, first 500 images (the run's dataset.test_subset; --full-test for all)`."""
    count, subset = record["num_examples"], record.get("run_test_subset")
    if record["split"] == "train":
        return f"train split as the run trained on it, {count} images"
    if subset is None:
        return f"test split, all {count} images"
    if record.get("full_test"):
        return f"test split, all {count} images (the run measured its first {subset}: dataset.test_subset)"
    return f"test split, first {count} images (the run's dataset.test_subset; --full-test for all)"


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
    parser.add_argument(
        "--full-test", action="store_true", help="the whole test split, also where the run measured a subset"
    )
    add_progress_argument(parser)
    return parser


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """--progress auto|bar|log|off (auto: bars on a terminal, plain lines otherwise) and --no-progress (= off)."""
    parser.add_argument(
        "--progress",
        default="auto",
        choices=PROGRESS_MODES,
        help="auto (default): bars on a terminal, plain lines otherwise; bar, log or off",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="off", help="--progress off")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in args.runs:
            record = evaluate_run(
                path, args.split, args.batch_size, args.device, args.data_root, args.progress, args.full_test
            )
            print(json.dumps(record) if args.json else format_result(record), flush=True)
    except SamReproError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
