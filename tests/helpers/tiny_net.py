"""The tiny network with BatchNorm that the step and optimizer tests run against hand-written updates, and a batch
for it: 6 features in, 3 classes out."""

from __future__ import annotations

import torch
from torch import nn


def tiny_bn_mlp(dropout: float = 0.0) -> nn.Module:
    """Linear(6, 16), BatchNorm1d, ReLU[, Dropout(dropout)], Linear(16, 3), in float32, its weights drawn from
    `torch.manual_seed(0)` (Dropout has no weights: the same weights either way). `.double()` for float64."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers)


def batch(n: int = 8, seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` inputs for `tiny_bn_mlp` (standard normal, in `dtype`) and their labels, from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)
