"""Device-resident loaders: the whole split lives on the training device as uint8, batches are gathered and
augmented there with batched tensor ops (airbench style), no per-image Python in the hot path.

Order and randomness are functions of (seed, epoch, batch index) only:
  * the epoch's permutation comes from a generator seeded by (seed, epoch);
  * each *global* batch's augmentation draws come from a generator seeded by (seed, epoch, batch index), drawn for
    the whole global batch; every rank slices its share.
So a loader resumed at (epoch, position) continues exactly where an uninterrupted one would, and one process with
batch 64 sees the same examples and the same augmentations as two processes with 32 each.

No host-device copy per batch: when an epoch starts, this rank's indices and augmentation draws for the rest of
the epoch are drawn on the CPU (the same values, batch by batch) and copied to the device in one go (from pinned
memory on a GPU). AutoAugment, which works per image on the CPU, reads a CPU copy of the split (made once) and runs
in a thread one batch ahead of training; only its result is copied to the device, without blocking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sam_repro.data.augment import BatchAugment, Draws, host_to_device, normalize

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant for seed mixing


def seed_from(*parts: int) -> int:
    """A generator seed that is a function of `parts` (e.g. seed, epoch, batch index) only."""
    s = 0
    for p in parts:
        s = (s * _MIX + int(p) + 1) % (2**63 - 1)
    return s


def to_device_uint8(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """N x H x W x C uint8 (numpy) -> N x C x H x W uint8 on `device`, contiguous."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous()


class TrainLoader:
    """Shuffled, augmented global batches of `global_batch` examples; this rank yields its `global_batch / world`.

    The last incomplete batch is dropped (official code: drop_remainder in training).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        global_batch: int,
        augment: BatchAugment,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        cpu_augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.augment, self.seed = augment, seed
        self.cpu_augment = cpu_augment  # per-image augmentation on uint8 (AutoAugment), before the batched ops
        self.cpu_images = images.cpu() if cpu_augment is not None else None  # what it reads (no copy on a CPU)
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.labels) // self.global_batch

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]))

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_from(self.seed, epoch))
        return torch.randperm(len(self.labels), generator=g)

    def _plan(self, first: int) -> tuple[torch.Tensor, list[torch.Generator], Draws]:
        """This rank's example indices (batches x local batch, on the CPU) for batches first, first + 1, ... of the
        epoch, the generator of each batch after its augmentation draws (AutoAugment draws from it next), and the
        draws themselves, stacked on the device."""
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        batches = self.permutation(self.epoch)[: len(self) * self.global_batch].view(len(self), self.global_batch)
        generators = [
            torch.Generator().manual_seed(seed_from(self.seed, self.epoch, b)) for b in range(first, len(self))
        ]
        draws = [self.augment.draw(self.global_batch, g).slice(lo, hi) for g in generators]
        return batches[first:, lo:hi].contiguous(), generators, Draws.stack(draws, self.images.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cpu_indices, generators, draws = self._plan(self.position)
        indices = host_to_device(cpu_indices, self.images.device)
        autoaugmented = self._autoaugment_ahead(cpu_indices, generators) if self.cpu_augment is not None else None
        for i in range(len(cpu_indices)):
            images = self.images[indices[i]] if autoaugmented is None else next(autoaugmented)
            x = self.augment(images, draws[i])
            self.position += 1  # counted before yielding: a checkpoint taken after this step resumes after it
            yield x, self.labels[indices[i]]

    def _autoaugment_ahead(
        self, cpu_indices: torch.Tensor, generators: list[torch.Generator]
    ) -> Iterator[torch.Tensor]:
        """The AutoAugmented uint8 images of each planned batch, on the device. Each batch is augmented in a thread
        while the previous one trains; AutoAugment draws from the batch's own generator only, so the result does not
        depend on the timing."""
        pinned = self.images.device.type == "cuda"
        cpu_augment, cpu_images = self.cpu_augment, self.cpu_images
        if cpu_augment is None or cpu_images is None or not len(cpu_indices):
            return
        planned = [(cpu_augment, cpu_images, cpu_indices[i], generators[i], pinned) for i in range(len(cpu_indices))]
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(_augmented, *planned[0])
            for i in range(len(planned)):
                images = ahead.result()
                if i + 1 < len(planned):
                    ahead = pool.submit(_augmented, *planned[i + 1])
                yield images.to(self.images.device, non_blocking=True)


def _augmented(
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    images: torch.Tensor,
    indices: torch.Tensor,
    generator: torch.Generator,
    pinned: bool,
) -> torch.Tensor:
    """AutoAugment's `augment` of one batch (`images[indices]`, uint8 on the CPU), pinned for the copy to a GPU if
    `pinned`; run in the loader's thread."""
    out = augment(images[indices], generator)
    return out.pin_memory() if pinned else out


class EvalLoader:
    """Exact evaluation: this rank takes a contiguous shard of the split (no padding, no duplicates), so summing
    correct counts over ranks counts every example exactly once, for any world size."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch: int,
        mean: Sequence[float],
        std: Sequence[float],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n = len(labels)
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        self.images, self.labels = images[lo:hi], labels[lo:hi]
        self.batch, self.mean, self.std = batch, list(mean), list(std)
        self.total = n

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch):
            yield (
                normalize(self.images[start : start + self.batch], self.mean, self.std),
                self.labels[start : start + self.batch],
            )
