"""The real trainer (`sam_repro.engine.trainer.train`) on a small synthetic export, for two checks of the GPU check.
A subprocess, so that each check starts with a fresh environment and a fresh CUDA context:

    python -m sam_repro.acceptance.trainer_worker deterministic|resume WORKDIR cuda|cpu

deterministic: two steps with `trainer.deterministic=true`, in whatever environment the caller gave.
resume:        a run of 2 epochs, against one stopped after epoch 1 (its checkpoint written on the device) and resumed
               by running the same command again: weights, optimizer state, every RNG state and the metrics must be
               equal bit for bit.
The config is composed as `sam-train` composes it; the data is random uint8 images written as a `sam-data` export
and read through `dataset.export` (the trainer's own `build_data`); checkpoints are read with the one loader
(`engine.checkpoint.load_checkpoint`). Needs hydra-core and omegaconf. Prints `RESULT {"ok": .., "detail": ..}`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from sam_repro.data.arrays import DatasetArrays
from sam_repro.data.export import export_subset
from sam_repro.engine.checkpoint import load_checkpoint
from sam_repro.engine.rundir import RunFiles

NUM_TRAIN, NUM_TEST, BATCH = 128, 64, 64
TIMING_KEYS = {"images_per_second", "epoch_time_s"}


def synthetic_export(path: Path, seed: int = 11) -> Path:
    """Random CIFAR-shaped images and labels as a `sam-data cifar10 --export-subset` file: no dataset needed."""
    rng = np.random.default_rng(seed)
    arrays = DatasetArrays(
        "cifar10",
        10,
        rng.integers(0, 256, (NUM_TRAIN, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, NUM_TRAIN).astype(np.int64),
        rng.integers(0, 256, (NUM_TEST, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, NUM_TEST).astype(np.int64),
    )
    export_subset(arrays, NUM_TRAIN, NUM_TEST, path, source={"synthetic": f"numpy default_rng({seed})"})
    return path


def compose(device: str, export: Path, *extra: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    overrides = [
        "model=resnet8",
        f"dataset.export={export}",
        "optimizer=sam",
        f"trainer.device={device}",
        "trainer.deterministic=true",
        f"trainer.batch_size={BATCH}",
        "trainer.m=32",
        "trainer.epochs=2",
        "trainer.grad_clip=5.0",
        "trainer.eval_batch_size=128",
        "trainer.progress=off",
        "logger=none",
        *extra,
    ]
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in RunFiles(run_dir).metrics.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def run(mode: str, workdir: Path, device: str) -> dict:
    import os

    from sam_repro.engine import trainer

    workdir.mkdir(parents=True, exist_ok=True)
    export = synthetic_export(workdir / "synthetic-cifar10.npz")
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("sam_repro").addHandler(handler)
    logging.getLogger("sam_repro").setLevel(logging.INFO)

    if mode == "deterministic":
        summary = trainer.train(compose(device, export, "trainer.epochs=1", "trainer.max_steps=2"), workdir / "run")
        return {
            "ok": summary["status"] == "finished",
            "detail": f"2 steps with trainer.deterministic=true on {device}: {summary['status']} "
            f"(CUBLAS_WORKSPACE_CONFIG afterwards: {os.environ.get('CUBLAS_WORKSPACE_CONFIG')})",
        }

    steps_per_epoch = NUM_TRAIN // BATCH
    whole, parted = workdir / "uninterrupted", workdir / "resumed"
    trainer.train(compose(device, export), whole)
    trainer.train(compose(device, export, f"trainer.max_steps={steps_per_epoch}"), parted)  # stops after epoch 1
    RunFiles(parted).summary.unlink()  # so the same command resumes from its checkpoint
    messages.clear()
    trainer.train(compose(device, export), parted)
    resumed = any(m.startswith("resumed from") for m in messages)
    a = load_checkpoint(RunFiles(whole).checkpoint)
    b = load_checkpoint(RunFiles(parted).checkpoint)
    same = {key: _equal(a[key], b[key]) for key in ("model", "optimizer", "rng", "step", "epoch")}
    same["metrics"] = _metrics(whole) == _metrics(parted)
    ok = resumed and all(same.values())
    differ = [k for k, v in same.items() if not v]
    return {
        "ok": ok,
        "detail": f"resumed from the epoch-1 checkpoint: {resumed}; "
        + (
            "weights, optimizer state, RNG states and metrics equal bitwise"
            if not differ
            else f"differ: {', '.join(differ)}"
        )
        + f" (on {device})",
    }


def main(argv: list[str]) -> int:
    mode, workdir, device = argv
    print("RESULT " + json.dumps(run(mode, Path(workdir), device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
