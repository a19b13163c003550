"""PyramidNet (Han et al. 2017), optionally with ShakeDrop (Yamada et al. 2018), as in the official SAM code
(`sam_jax/models/pyramidnet.py`, which only has the ShakeDrop variant; the paper's plain "PyramidNet" row is the
same network without ShakeDrop).

The width grows by alpha / N channels per block over all N blocks (eq. 2 of Han et al.), from 16 to 16 + alpha.
Block widths are *rounded* as in the official code and its follow-ups (`width_rounding="round"`, default), not
truncated as in Han et al. (`"floor"`). PyramidNet-272 (alpha 200, bottleneck) has 26,210,842 parameters for 10
classes when rounded and 26,046,428 when truncated, the published 26.0 M; the official docstring's "roughly 0.2 M
additional parameters" is this difference.

Network: 3x3 stem conv to 16 channels + BN; three stages of N / 3 blocks (the last two start with stride 2); a
final BN-ReLU, global average pooling and the dense layer. Blocks have no ReLU after the addition nor before the
first conv:
  bottleneck (depth = 9n + 2): BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN,
  basic      (depth = 6n + 2): BN-conv3x3-BN-ReLU-conv3x3-BN.
The shortcut average-pools to the new resolution and zero-pads the new channels (no parameters).
ShakeDrop scales block l of N with keep probability p_l = 1 - (l / N) (1 - p_N), the "linear decay rule" with
p_N = 0.5, alpha in [-1, 1] and beta in [0, 1] (official values).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sam_repro.errors import ConfigError
from sam_repro.models.layers import (
    Classifier,
    check_norm,
    conv,
    init_cifar_weights,
    make_norm,
    pool_and_pad,
    zero_init_residual_branches,
)
from sam_repro.models.shake import ShakeDrop

# Python's round() is round-half-to-even, like the official code's `int(round(...))`.
WIDTH_ROUNDINGS = {"round": lambda width: int(round(width)), "floor": lambda width: int(math.floor(width))}


class PyramidBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        norm: str,
        bottleneck: bool,
        shakedrop: ShakeDrop | None,
    ):
        super().__init__()
        self.out_channels = 4 * channels if bottleneck else channels
        self.stride = stride
        if bottleneck:
            layers = [
                make_norm(norm, in_channels),
                conv(in_channels, channels, 1, 1, norm),
                make_norm(norm, channels),
                nn.ReLU(),
                conv(channels, channels, 3, stride, norm),
                make_norm(norm, channels),
                nn.ReLU(),
                conv(channels, self.out_channels, 1, 1, norm),
                make_norm(norm, self.out_channels),
            ]
        else:
            layers = [
                make_norm(norm, in_channels),
                conv(in_channels, channels, 3, stride, norm),
                make_norm(norm, channels),
                nn.ReLU(),
                conv(channels, channels, 3, 1, norm),
                make_norm(norm, channels),
            ]
        self.branch = nn.Sequential(*layers)
        self.shakedrop = shakedrop if shakedrop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_and_pad(x, self.out_channels, self.stride) + self.shakedrop(self.branch(x))


class PyramidNet(nn.Module):
    def __init__(
        self,
        depth: int = 272,
        alpha: float = 200,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "batch",
        bottleneck: bool = True,
        shakedrop: bool = False,
        final_keep_prob: float = 0.5,
        alpha_range: tuple[float, float] = (-1.0, 1.0),
        beta_range: tuple[float, float] = (0.0, 1.0),
        width_rounding: str = "round",
    ):
        super().__init__()
        check_norm(norm)
        if width_rounding not in WIDTH_ROUNDINGS:
            choices = ", ".join(WIDTH_ROUNDINGS)
            raise ConfigError(f"model.width_rounding must be one of {choices} (got {width_rounding!r})")
        to_int = WIDTH_ROUNDINGS[width_rounding]
        layers_per_block = 3 if bottleneck else 2
        if (depth - 2) % (3 * layers_per_block) or depth < 2 + 3 * layers_per_block:
            kind = "9n + 2 with bottleneck blocks, e.g. 272" if bottleneck else "6n + 2 with basic blocks, e.g. 110"
            raise ConfigError(f"model.depth of a PyramidNet must be {kind} (got {depth})")
        if not 0.0 <= final_keep_prob <= 1.0:
            raise ConfigError(f"model.final_keep_prob must lie in [0, 1] (got {final_keep_prob})")
        blocks_per_stage = (depth - 2) // (3 * layers_per_block)
        total_blocks = 3 * blocks_per_stage
        width_step = alpha / total_blocks

        self.stem = nn.Sequential(conv(in_channels, 16, 3, 1, norm), make_norm(norm, 16))
        blocks, width, channels = [], 16.0, 16
        for index in range(total_blocks):
            layer = index + 1
            width += width_step
            stride = 2 if index in (blocks_per_stage, 2 * blocks_per_stage) else 1
            regulariser = None
            if shakedrop:
                keep_prob = 1.0 - layer / total_blocks * (1.0 - final_keep_prob)
                regulariser = ShakeDrop(keep_prob, tuple(alpha_range), tuple(beta_range))
            block = PyramidBlock(channels, to_int(width), stride, norm, bottleneck, regulariser)
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = make_norm(norm, channels)
        self.relu = nn.ReLU()
        self.classifier = Classifier(channels, num_classes)

        init_cifar_weights(self)
        if norm == "none":
            zero_init_residual_branches([block.branch[-2] for block in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(self.relu(self.final_norm(x)))
