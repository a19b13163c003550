"""What the parts of the GPU check share: the project's optimizers and steps built without a config, synthetic
device-resident data, autocast by precision name, and device synchronisation for timing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from sam_repro.data.augment import BatchAugment
from sam_repro.data.loader import TrainLoader
from sam_repro.engine.step import StepContext, sam_step, sgd_step
from sam_repro.optim.factory import create_optimizer

STEPS = {"sgd": sgd_step, "sam": sam_step}
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]  # CIFAR-like; any values do for synthetic images


def make_optimizer(
    name: str, model: torch.nn.Module, lr: float = 0.1, rho: float = 0.05, weight_decay: float = 5e-4
) -> torch.optim.Optimizer:
    """The paper's recipe (Nesterov SGD, L2 weight decay inside the ascent gradient), through the project's own
    factory: `name` is sgd or sam."""
    return create_optimizer(
        model, name, lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, weight_decay_mode="l2", rho=rho
    )


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """fp32 / tf32: no autocast; bf16 / fp16: autocast to that type (the trainer's `trainer.precision`)."""
    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def step_context(
    group_size: int,
    precision: str,
    device: torch.device,
    grad_clip: float | None = 5.0,
    scaler: torch.amp.GradScaler | None = None,
) -> StepContext:
    return StepContext(
        group_size=group_size, grad_clip=grad_clip, autocast=autocast_for(precision, device), scaler=scaler
    )


def synthetic_images(
    n: int, size: int, channels: int, device: torch.device, classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """n uint8 images (N, C, H, W) and labels on `device`, as the device-resident loader holds a dataset."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return images.to(device), labels.to(device)


def basic_augment(size: int, channels: int = 3) -> BatchAugment:
    """The paper's basic CIFAR augmentation (reflect-pad 4, random crop, flip) on the device."""
    return BatchAugment({"crop": True, "pad": 4, "flip": True}, MEAN[:channels], STD[:channels], (size, size))


def synthetic_loader(n: int, size: int, batch: int, device: torch.device, seed: int = 0) -> TrainLoader:
    images, labels = synthetic_images(n, size, 3, device, seed=seed)
    return TrainLoader(images, labels, batch, basic_augment(size), seed=seed)


def endless(loader: TrainLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches forever, epoch after epoch (for timing loops)."""
    epoch = loader.epoch
    while True:
        yield from loader
        epoch += 1
        loader.set_epoch(epoch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
