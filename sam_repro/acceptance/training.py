"""A short SGD-vs-SAM training on real CIFAR-10, when the machine has it: a prepared cache (`sam-data cifar10`) or a
file written by `sam-data cifar10 --export-subset N` (copied to the node). bf16, the paper's recipe (Nesterov SGD,
L2 weight decay, cosine, clipping at 5, m = 32), the trainer's own loaders and steps; test error after every epoch.
The number of epochs is chosen up front from a timed probe so that both runs fit the time given.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sam_repro.acceptance.common import STEPS, autocast_for, make_optimizer, step_context, sync
from sam_repro.data.arrays import DatasetArrays
from sam_repro.data.augment import BatchAugment
from sam_repro.data.loader import EvalLoader, TrainLoader, to_device_uint8
from sam_repro.engine.distributed import DistEnv
from sam_repro.engine.evaluation import evaluate
from sam_repro.errors import DataError
from sam_repro.models import create_model
from sam_repro.optim.factory import build_schedule


def find_cifar10(data: str | None) -> tuple[DatasetArrays, str] | None:
    """The arrays and where they came from: `data` (an export), else the prepared cache, else none."""
    from sam_repro.data.export import read_export
    from sam_repro.data.sources import cache_path, verify

    if data:
        arrays, meta = read_export(Path(data))
        return arrays, f"{data} ({meta['num_train']} training, {meta['num_test']} test images)"
    if cache_path("cifar10").exists():
        try:
            arrays, _ = verify("cifar10")
        except DataError:
            return None
        return arrays, f"{cache_path('cifar10')} (the prepared cache)"
    return None


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
    return flat.mean(0).tolist(), flat.std(0).tolist()


def short_training(arrays: DatasetArrays, device: torch.device, seconds: float, smoke: bool, log=print) -> dict:
    """SGD, then SAM, for the same number of epochs; returns the per-epoch test errors and the timing."""
    model_name, arch = ("resnet8", {}) if smoke else ("wrn16_4", {})
    if smoke:  # a few hundred images: the code path, not a result
        arrays = DatasetArrays(
            arrays.name,
            arrays.num_classes,
            arrays.train_images[:256],
            arrays.train_labels[:256],
            arrays.test_images[:200],
            arrays.test_labels[:200],
        )
    batch, m, precision = (64, 32, "bf16")
    mean, std = _channel_stats(arrays.train_images[:10_000])
    augment = BatchAugment({"crop": True, "pad": 4, "flip": True}, mean, std, arrays.train_images.shape[1:3])
    images = to_device_uint8(arrays.train_images, device)
    labels = torch.from_numpy(arrays.train_labels).to(device)
    test = EvalLoader(
        to_device_uint8(arrays.test_images, device), torch.from_numpy(arrays.test_labels).to(device), 1000, mean, std
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend="gloo", launcher="single")
    if not smoke:
        batch = 256
    steps_per_epoch = len(arrays.train_labels) // batch

    def run(optimizer_name: str, epochs: int, probe_steps: int | None = None) -> dict:
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=arrays.num_classes, **arch).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(optimizer_name, model)
        schedule = build_schedule(
            SimpleNamespace(name="cosine", warmup_epochs=0.0, min_lr=0.0),
            optimizer,
            epochs * steps_per_epoch,
            steps_per_epoch,
        )
        loader = TrainLoader(images, labels, batch, augment, seed=0)
        ctx = step_context(m, precision, device)
        errors, start = [], time.perf_counter()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            model.train()
            for i, (x, y) in enumerate(loader):
                STEPS[optimizer_name](model, optimizer, x, y, ctx)
                schedule.step()
                if probe_steps is not None and i + 1 == probe_steps:
                    sync(device)
                    return {"seconds_per_step": (time.perf_counter() - start) / probe_steps}
            errors.append(round(evaluate(model, test, env, autocast_for(precision, device))["error"], 2))
            log(f"real data: {optimizer_name} epoch {epoch + 1}/{epochs}: test error {errors[-1]:.2f}%")
        sync(device)
        return {"test_error": errors, "seconds": round(time.perf_counter() - start, 1)}

    if smoke:
        epochs = 1
    else:
        probe = min(10, steps_per_epoch)
        run("sam", 1, probe_steps=probe)  # compiles nothing; warms up kernels and memory
        per_sam_step = run("sam", 1, probe_steps=probe)["seconds_per_step"]
        per_epoch = 1.5 * per_sam_step * steps_per_epoch  # SGD costs about half a SAM step
        epochs = max(1, min(30, math.floor(seconds / per_epoch)))
    results = {name: run(name, epochs) for name in ("sgd", "sam")}
    return {
        "model": model_name,
        "precision": precision,
        "batch": batch,
        "m": m,
        "epochs": epochs,
        "num_train": int(len(arrays.train_labels)),
        "num_test": int(len(arrays.test_labels)),
        "runs": results,
        "sam_minus_sgd": round(results["sam"]["test_error"][-1] - results["sgd"]["test_error"][-1], 2),
    }
