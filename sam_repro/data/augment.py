"""Batched image augmentation on the training device: no per-image Python in the hot path.

The paper's CIFAR pipeline (official code, docs/paper_reference.md section 2.2), in order:
  1. AutoAugment (optional, per image, on uint8; see `autoaugment.py`),
  2. "basic": reflect-pad 4 + random 32x32 crop + horizontal flip, on uint8,
  3. normalization with the per-dataset mean/std,
  4. cutout 16 px (optional) *after* normalization, filled with 0 -- one mask per batch in the official code,
     an independent mask per image as an option.
Every random draw comes from an explicit `torch.Generator` so the loader can checkpoint and replay it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory, so the copy does not block the host."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@functools.cache
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean * 255, 1 / (std * 255)) as (1, C, 1, 1) tensors on `device`, made once (not copied per batch)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    inv_std_t = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
    return mean_t.to(device), inv_std_t.to(device)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalized with per-channel mean/std given in [0, 1] units."""
    mean_t, inv_std_t = _channel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() - mean_t) * inv_std_t


def crop(images: torch.Tensor, offsets: torch.Tensor, pad: int, mode: str = "reflect") -> torch.Tensor:
    """Pad each side by `pad`, then crop the original size at per-image offsets (N, 2) in [0, 2*pad].

    One padded copy plus two gathers, whatever the batch size.
    """
    if pad <= 0:
        return images
    n, c, h, w = images.shape
    if mode == "reflect":
        # F.pad's reflect mode needs a float tensor; the values stay exact integers in [0, 255].
        padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect").to(images.dtype)
    elif mode == "constant":
        padded = F.pad(images, (pad, pad, pad, pad), mode="constant", value=0)
    else:
        raise ValueError(f"augment.pad_mode must be reflect or constant (got {mode!r})")
    offsets = offsets.to(images.device)
    rows = (offsets[:, 0:1] + torch.arange(h, device=images.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (offsets[:, 1:2] + torch.arange(w, device=images.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip left-right the images whose boolean `mask` entry is true."""
    return torch.where(mask.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def cutout(images: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a `size` x `size` square (clipped at the borders) around each centre (K, 2) as (row, col).

    K = 1 applies one mask to the whole batch (the official code); K = N one mask per image. Apply after
    normalization so the masked pixels equal the dataset mean.
    """
    if size <= 0:
        return images
    _, _, h, w = images.shape
    centres = centres.to(images.device)
    top, left = centres[:, 0] - size // 2, centres[:, 1] - size // 2
    ys = torch.arange(h, device=images.device).view(1, h)
    xs = torch.arange(w, device=images.device).view(1, w)
    in_y = (ys >= top.view(-1, 1)) & (ys < (top + size).view(-1, 1))  # (K, h)
    in_x = (xs >= left.view(-1, 1)) & (xs < (left + size).view(-1, 1))  # (K, w)
    mask = (in_y.unsqueeze(2) & in_x.unsqueeze(1)).unsqueeze(1)  # (K, 1, h, w)
    return images.masked_fill(mask, 0.0)


@dataclass
class Draws:
    """The random choices for one global batch. Drawn once for the whole batch, so every rank slices the same
    draws and the augmented batch does not depend on how many ranks share it."""

    offsets: torch.Tensor | None  # (B, 2) crop offsets
    flips: torch.Tensor | None  # (B,) bool
    centres: torch.Tensor | None  # (1 or B, 2) cutout centres

    def slice(self, start: int, stop: int) -> Draws:
        centres = self.centres
        if centres is not None and len(centres) > 1:
            centres = centres[start:stop]
        return Draws(
            None if self.offsets is None else self.offsets[start:stop],
            None if self.flips is None else self.flips[start:stop],
            centres,
        )

    @staticmethod
    def stack(draws: Sequence[Draws], device: torch.device) -> Draws:
        """The draws of several batches as one Draws with a leading batch dimension, on `device` (one copy per
        field); index it with `[i]`. Pinned first for a GPU, so the copies do not block."""
        return Draws(*(_stacked([getattr(d, name) for d in draws], device) for name in ("offsets", "flips", "centres")))

    def __getitem__(self, i: int) -> Draws:
        return Draws(*(None if t is None else t[i] for t in (self.offsets, self.flips, self.centres)))


def _stacked(values: list[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """One field of several batches' draws stacked on `device` (None for no batches or a field not drawn)."""
    return None if not values or values[0] is None else host_to_device(torch.stack(values), device)


class BatchAugment:
    """The paper's pipeline on a uint8 batch: [crop + flip] -> normalize -> [cutout]. AutoAugment, when asked for,
    runs before this on the CPU (per image) in the loader."""

    def __init__(self, cfg, mean: Sequence[float], std: Sequence[float], image_size: tuple[int, int]):
        self.crop = bool(cfg.get("crop", False))
        self.pad = int(cfg.get("pad", 4))
        self.pad_mode = str(cfg.get("pad_mode", "reflect"))
        self.flip = bool(cfg.get("flip", False))
        self.cutout = int(cfg.get("cutout", 0) or 0)
        self.cutout_per_image = bool(cfg.get("cutout_per_image", False))
        self.mean, self.std = list(mean), list(std)
        self.image_size = image_size

    def draw(self, batch: int, generator: torch.Generator) -> Draws:
        h, w = self.image_size
        offsets = torch.randint(0, 2 * self.pad + 1, (batch, 2), generator=generator) if self.crop else None
        flips = (torch.rand(batch, generator=generator) < 0.5) if self.flip else None
        centres = None
        if self.cutout > 0:
            k = batch if self.cutout_per_image else 1
            centres = torch.stack(
                [torch.randint(0, h, (k,), generator=generator), torch.randint(0, w, (k,), generator=generator)], dim=1
            )
        return Draws(offsets, flips, centres)

    def __call__(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        if draws.offsets is not None:
            images = crop(images, draws.offsets, self.pad, self.pad_mode)
        if draws.flips is not None:
            images = flip(images, draws.flips)
        x = normalize(images, self.mean, self.std)
        if draws.centres is not None:
            x = cutout(x, draws.centres, self.cutout)
        return x
