"""Building blocks shared by the CIFAR networks: normalization choice, convolutions, shortcuts and initialisation.

The official SAM code (docs/paper_reference.md section 2.2) fixes three conventions that every CIFAR model here follows:
  * BatchNorm with flax momentum 0.9 / eps 1e-5, which is torch's `nn.BatchNorm2d` default (torch's momentum 0.1 is
    the weight of the *new* batch, flax's 0.9 the weight of the running average);
  * convolution kernels drawn Kaiming-normal, fan_out, gain 2 (`variance_scaling(2.0, 'fan_out', 'normal')`);
  * the final dense layer drawn U[-1/sqrt(num_classes), +1/sqrt(num_classes)] with a zero bias (AutoAugment's WRN).

`norm` selects the normalization of every CIFAR model: `batch` (the paper), `group` (batch-independent, for tests
that must not depend on how a batch is split) or `none` (no normalization at all: exact distributed tests and the
paper's Hessian analysis of a BatchNorm-free WideResNet).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam_repro.errors import ConfigError

NORMS = ("batch", "group", "none")

# Wu & He (2018) use 32 groups; layers narrower than that (or not divisible by it) fall back to the largest power
# of two dividing both, so every GroupNorm still sees whole groups.
GROUP_NORM_GROUPS = 32


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"model.norm must be one of {', '.join(NORMS)} (got {norm!r})")
    return norm


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalization layer `kind` (`batch | group | none`) for a feature map with `channels` channels.

    Plain `nn.BatchNorm2d` on purpose: the trainer switches `track_running_stats` and swaps the running buffers to
    implement ghost batches and SAM's "running statistics from the clean pass only", which needs the stock module.
    """
    check_norm(kind)
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    if kind == "group":
        return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels, eps=1e-5)
    return nn.Identity()


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, norm: str = "batch") -> nn.Conv2d:
    """A 'SAME'-padded convolution. It carries a bias only when no normalization follows to provide the shift."""
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=norm == "none"
    )


def pool_and_pad(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Parameter-free shortcut of the official WRN and PyramidNet: average-pool to the new resolution, then append
    zero channels up to `out_channels`.

    `ceil_mode` keeps the shortcut's resolution equal to the one of a stride-2 'SAME' convolution on odd sizes too
    (7 -> 4), so the networks accept any input size.
    """
    if stride > 1:
        x = F.avg_pool2d(x, stride, stride, ceil_mode=True)
    missing = out_channels - x.shape[1]
    if missing > 0:
        x = F.pad(x, (0, 0, 0, 0, 0, missing))
    return x


def init_cifar_weights(model: nn.Module) -> None:
    """Initialise convolutions and the final classifier as the official code does (see module docstring).

    Normalization layers keep torch's defaults (scale 1, shift 0), the same as flax's.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


def zero_init_residual_branches(branch_ends: list[nn.Module]) -> None:
    """Start every residual branch at zero (the network starts as the identity path plus the classifier).

    Used for `norm=none` only. Without normalization every residual block adds a branch of comparable variance at
    Kaiming initialisation, so activations grow geometrically with depth: a WRN-40 starts with logits ~60x larger
    than with BatchNorm (std 40 vs 0.65 on Gaussian inputs) and diverges at the paper's learning rates. A
    zero-initialised last layer per branch (SkipInit, De & Smith 2020; Fixup, Zhang et al. 2019) keeps it trainable
    without adding parameters. With BatchNorm or GroupNorm the official initialisation is kept.
    """
    for layer in branch_ends:
        nn.init.zeros_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)


class GlobalAvgPool(nn.Module):
    """The mean over the spatial dimensions, kept as (N, C, 1, 1). Written as a mean rather than
    `nn.AdaptiveAvgPool2d(1)`, whose CUDA backward has no deterministic implementation: with it
    `trainer.deterministic=true` stops at the first backward pass on a GPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class Classifier(nn.Sequential):
    """Global average pooling over any spatial size, then the dense layer."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__(GlobalAvgPool(), nn.Flatten(), nn.Linear(in_features, num_classes))
