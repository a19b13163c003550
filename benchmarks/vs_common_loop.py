"""The engine against the training loop people commonly write: one epoch each, same model, data and optimizer.

    python benchmarks/vs_common_loop.py [--device auto] [--images 5000] [--rounds 3] [--warmup-steps 3]
                                        [--model resnet20] [--out benchmarks/results/vs_common_loop.json]

Both sides train ResNet-20 (`create_model`, one fresh copy per variant, the same initial weights) with batch 128 on
the same `--images` real CIFAR-10 training images (the fixed subset `dataset.train_subset=N` picks with
subset_seed 0, read from the prepared cache; `sam-data cifar10` makes it), lr 0.1, momentum 0.9, weight decay
5e-4, SAM with rho 0.05, the last incomplete batch dropped:

  * the engine: the device-resident `TrainLoader` with the trainer's basic augmentation (reflect-pad 4 + random
    crop + flip as batched tensor ops, then normalization) and `sam_step` / `sgd_step` with
    `StepContext(group_size=128)` (m = the batch), optimizer `sam_repro.optim.sam.SAM` (weight decay as the L2
    term, its default) or torch's SGD with `l2_weight_decay` on its groups (the optimizer factory's sgd);
  * the common loop: a torch Dataset over the same uint8 arrays, PIL images through torchvision's
    RandomCrop(32, padding=4, padding_mode="reflect"), RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with
    num_workers=2, shuffle=True, drop_last=True and its other defaults (no persistent workers, no pinned memory),
    batches moved to the device in the loop; for SAM the common PyTorch port's two-pass step (davda54/sam, written
    out below: `CommonSAM`, with BatchNorm momentum 0 for the second pass), for SGD forward, backward, step.

Timing: after a warm-up (`--warmup-steps` steps of every variant), `--rounds` rounds each time one epoch of every
variant: engine SGD, common SGD, engine SAM, common SAM (the engine first in even rounds, the common loop first in
odd ones), then one pass over the engine's loader alone (gathering, augmenting and normalizing every batch of an
epoch, no training). Each epoch is timed whole (a CUDA synchronisation at its start and end only; the common
loop's epoch includes starting its workers, as every epoch of such a loop does). A speedup is the median over
rounds of (common loop's epoch time / the engine's, in the same round), so a machine that gets slower or faster
during the run affects both alike. The engine's data path share is the median over rounds of (that round's
loader-alone pass / the engine's SGD epoch time): the loader measured separately, in the same round, against the
cheaper of the two engine epochs (SAM's share, half as large, is recorded too).

Prints `sgd speedup X`, `sam speedup X` and `engine data path share X%` with their targets on this CPU (SGD speedup
at least 1.15, SAM at least 1.0, share below 5%) and whether they are met, then the median epoch times. Torch's
default thread count is left as it is and recorded. Writes `--out` with the raw per-round times, the ratios, the
targets and provenance. Without the prepared CIFAR-10 it prints one line naming the command to run and exits 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sam_repro.data import select_train_indices
from sam_repro.data.augment import BatchAugment
from sam_repro.data.loader import TrainLoader, to_device_uint8
from sam_repro.engine.distributed import resolve_device
from sam_repro.engine.provenance import write_result
from sam_repro.engine.step import StepContext, sam_step, sgd_step
from sam_repro.errors import ConfigError, SamReproError
from sam_repro.models import create_model
from sam_repro.optim.factory import create_optimizer
from sam_repro.optim.sam import SAM

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128
RHO = 0.05
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
WORKERS = 2  # the common loop's DataLoader workers
SUBSET_SEED = 0  # dataset.subset_seed: the same 5,000 images as the CPU-scale runs
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # configs/dataset/cifar10.yaml
BASIC = {"crop": True, "pad": 4, "pad_mode": "reflect", "flip": True}  # configs/augment/basic.yaml
TARGETS = {"sgd_speedup": (">=", 1.15), "sam_speedup": (">=", 1.0), "data_share": ("<", 0.05)}
VARIANTS = ("engine_sgd", "common_sgd", "engine_sam", "common_sam")


# ---- the common loop ----------------------------------------------------------------------------------------------


class CommonSAM(torch.optim.Optimizer):
    """The common PyTorch SAM port (davda54/sam, sam.py), as people copy it: eps = rho * g / (||g|| + 1e-12),
    the saved weights put back in second_step, weight decay left to the base optimizer (applied at w)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        assert rho >= 0.0, f"Invalid rho, should be non-negative: {rho}"
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum "w + e(w)"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # get back to "w" from "w + e(w)"
        self.base_optimizer.step()  # do the actual "sharpness-aware" update
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


def disable_running_stats(model: nn.Module) -> None:
    """davda54/sam's bypass_bn: BatchNorm momentum 0, so the second pass leaves the running statistics as they are."""

    def _disable(module):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.backup_momentum = module.momentum
            module.momentum = 0

    model.apply(_disable)


def enable_running_stats(model: nn.Module) -> None:
    def _enable(module):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and hasattr(module, "backup_momentum"):
            module.momentum = module.backup_momentum

    model.apply(_enable)


def common_sam_step(model: nn.Module, optimizer: CommonSAM, x: torch.Tensor, y: torch.Tensor) -> None:
    """davda54/sam's train.py step (plain cross-entropy)."""
    enable_running_stats(model)
    F.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    disable_running_stats(model)
    F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    enable_running_stats(model)


def common_sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


class ArrayDataset(Dataset):
    """uint8 N x H x W x C images and their labels as PIL images through `transform` (as torchvision's CIFAR10)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def common_loader(images: np.ndarray, labels: np.ndarray) -> DataLoader:
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    return DataLoader(
        ArrayDataset(images, labels, transform), batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True
    )


# ---- the engine ---------------------------------------------------------------------------------------------------


def engine_sgd(params) -> torch.optim.Optimizer:
    """torch's SGD, weight decay as the L2 gradient the engine's sgd_step adds (the optimizer factory's sgd)."""
    return create_optimizer(params, "sgd", **HYPER)


def engine_loader(images: np.ndarray, labels: np.ndarray, device: torch.device) -> TrainLoader:
    augment = BatchAugment(BASIC, MEAN, STD, images.shape[1:3])
    return TrainLoader(
        to_device_uint8(images, device), torch.from_numpy(labels.astype(np.int64)).to(device), BATCH, augment, seed=0
    )


# ---- data ---------------------------------------------------------------------------------------------------------


def training_images(n: int, synthetic: bool) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 training subset of `n` images (uint8 N x 32 x 32 x 3, labels), or random arrays (tests)."""
    if n < BATCH:
        raise ConfigError(f"--images must be at least the batch, {BATCH} (got {n})")
    if synthetic:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)
    from sam_repro.data.sources import verify  # DataError naming `sam-data cifar10` when it is not prepared

    arrays, _ = verify("cifar10")
    train_idx, _ = select_train_indices(len(arrays.train_labels), 0.0, n, SUBSET_SEED)
    return arrays.train_images[train_idx], arrays.train_labels[train_idx]


# ---- timing -------------------------------------------------------------------------------------------------------


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def met(name: str, value: float) -> bool:
    op, bound = TARGETS[name]
    return value >= bound if op == ">=" else value < bound


def run(args) -> dict:
    device = resolve_device(args.device, option="--device")
    images, labels = training_images(args.images, args.synthetic)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    eng_loader = engine_loader(images, labels, device)
    com_loader = common_loader(images, labels)
    ctx = StepContext(group_size=BATCH)

    def fresh_model() -> nn.Module:
        torch.manual_seed(0)
        return create_model(args.model, num_classes=10).to(device).train()

    models = {name: fresh_model() for name in VARIANTS}
    opts = {
        "engine_sgd": engine_sgd(models["engine_sgd"].parameters()),
        "common_sgd": torch.optim.SGD(models["common_sgd"].parameters(), **HYPER),
        "engine_sam": SAM(models["engine_sam"].parameters(), torch.optim.SGD, rho=RHO, **HYPER),
        "common_sam": CommonSAM(models["common_sam"].parameters(), torch.optim.SGD, rho=RHO, **HYPER),
    }
    engine_steps = {"engine_sgd": sgd_step, "engine_sam": sam_step}
    common_steps = {"common_sgd": common_sgd_step, "common_sam": common_sam_step}
    epochs = {"engine": 0}

    def epoch(name: str, steps: int | None = None) -> float:
        """Seconds for one epoch of `name` (or its first `steps` steps); "engine_loader": the loader alone."""
        if name.startswith("engine"):
            epochs["engine"] += 1
            eng_loader.set_epoch(epochs["engine"])
        sync()
        t0 = time.perf_counter()
        if name == "engine_loader":
            for _ in islice(eng_loader, steps):
                pass
        elif name in engine_steps:
            model, opt, step = models[name], opts[name], engine_steps[name]
            for x, y in islice(eng_loader, steps):
                step(model, opt, x, y, ctx)
        else:
            model, opt, step = models[name], opts[name], common_steps[name]
            for x, y in islice(com_loader, steps):
                step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        sync()
        return time.perf_counter() - t0

    for name in (*VARIANTS, "engine_loader"):  # warm-up: allocator, kernels, the first worker start
        epoch(name, args.warmup_steps)
    seconds: dict[str, list[float]] = {name: [] for name in (*VARIANTS, "engine_loader")}
    for r in range(args.rounds):
        engine_first = r % 2 == 0
        for kind in ("sgd", "sam"):
            pair = (f"engine_{kind}", f"common_{kind}")
            for name in pair if engine_first else pair[::-1]:
                seconds[name].append(epoch(name))
                print(f"round {r + 1}/{args.rounds}: {name} {seconds[name][-1]:.1f} s", file=sys.stderr)
        seconds["engine_loader"].append(epoch("engine_loader"))

    per_round = {
        "sgd_speedup": [c / e for c, e in zip(seconds["common_sgd"], seconds["engine_sgd"])],
        "sam_speedup": [c / e for c, e in zip(seconds["common_sam"], seconds["engine_sam"])],
        "data_share": [d / e for d, e in zip(seconds["engine_loader"], seconds["engine_sgd"])],
        "data_share_sam": [d / e for d, e in zip(seconds["engine_loader"], seconds["engine_sam"])],
    }
    medians = {key: statistics.median(values) for key, values in per_round.items()}
    return {
        "what": "one epoch: the common loop's time over the engine's (speedup), median over round-robin rounds; "
        "the engine's loader alone over its SGD epoch (data_share)",
        "model": args.model,
        "batch": BATCH,
        "rho": RHO,
        **HYPER,
        "data": "synthetic uint8 (test only)" if args.synthetic else f"cifar10 train subset, subset_seed {SUBSET_SEED}",
        "images": args.images,
        "steps_per_epoch": len(eng_loader),
        "common_loop_workers": WORKERS,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "warmup_steps": args.warmup_steps,
        "epoch_seconds": seconds,
        "per_round": per_round,
        **medians,
        "targets": {key: f"{op} {bound}" for key, (op, bound) in TARGETS.items()},
        "met": {key: met(key, medians[key]) for key in TARGETS},
    }


def report(result: dict) -> list[str]:
    def verdict(key: str) -> str:
        op, bound = TARGETS[key]
        shown = f"{bound * 100:g}%" if key == "data_share" else f"{bound:.2f}"
        return f"(target {op} {shown}: {'met' if result['met'][key] else 'missed'})"

    times = {name: statistics.median(values) for name, values in result["epoch_seconds"].items()}
    return [
        f"sgd speedup {result['sgd_speedup']:.2f} {verdict('sgd_speedup')}",
        f"sam speedup {result['sam_speedup']:.2f} {verdict('sam_speedup')}",
        f"engine data path share {result['data_share'] * 100:.1f}% {verdict('data_share')}",
        "epoch seconds (median over rounds): "
        + ", ".join(f"{name.replace('_', ' ')} {times[name]:.2f}" for name in (*VARIANTS, "engine_loader")),
        f"({result['model']}, batch {result['batch']}, {result['images']} images, {result['steps_per_epoch']} steps "
        f"per epoch, {result['rounds']} rounds, {result['device']}, {result['threads']} torch threads)",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--images", type=int, default=5000, help="CIFAR-10 training images (default: 5000)")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds of one epoch per variant (default: 3)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps of every variant before timing (default: 3)")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--out", default=str(RESULTS / "vs_common_loop.json"))
    ap.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)  # random arrays, for the tests
    args = ap.parse_args(argv)
    try:
        if args.rounds < 1 or args.warmup_steps < 0:
            raise ConfigError(f"--rounds must be >= 1 and --warmup-steps >= 0 (got {args.rounds}, {args.warmup_steps})")
        result = run(args)
    except SamReproError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in report(result):
        print(line)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
