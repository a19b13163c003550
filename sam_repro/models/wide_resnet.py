"""Pre-activation Wide ResNet (Zagoruyko & Komodakis 2016) as in the official code (`sam_jax/models/wide_resnet.py`).

WRN-d-k: a 3x3 stem conv to 16 channels, then three groups of n = (d - 4) / 6 pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-conv3x3) with 16k, 32k, 64k channels, the last two groups starting with stride 2; a final
BN-ReLU, global average pooling and the dense layer. The first block of the network applies its BN-ReLU before
the residual split, so its shortcut sees the activated input (official `activate_before_residual`).

Shortcut (`shortcut=`) where the shape changes:
  * `avgpool_pad` (default, the official code): average-pool to the new resolution and zero-pad the channels; no
    parameters. WRN-28-10 then has 36,220,634 parameters for 10 classes, 0.8% under the published 36.5 M;
  * `conv`: a 1x1 projection conv on the activated input (the original WRN paper and davda54/sam's WRN-16-8);
    WRN-28-10 then has 36,479,194 parameters, the published 36.5 M.
The official variant is the default because it is the network the paper trained and its count is within 1% of
the published one, which was computed for the projection variant.
"""

from __future__ import annotations

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

SHORTCUTS = ("avgpool_pad", "conv")


class PreActBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: str,
        shortcut: str,
        activate_before_residual: bool,
    ):
        super().__init__()
        self.pre_norm = make_norm(norm, in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, stride, norm)
        self.norm2 = make_norm(norm, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, 1, norm)
        self.relu = nn.ReLU()
        self.out_channels = out_channels
        self.stride = stride
        reshapes = stride != 1 or in_channels != out_channels
        self.projection = conv(in_channels, out_channels, 1, stride, norm) if shortcut == "conv" and reshapes else None
        # The projection of the original WRN reads the activated input, as does the very first block's shortcut in
        # the official code; the official parameter-free shortcut of later blocks reads the raw input.
        self.shortcut_from_activated = activate_before_residual or self.projection is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.pre_norm(x))
        branch = self.conv2(self.relu(self.norm2(self.conv1(activated))))
        identity = activated if self.shortcut_from_activated else x
        if self.projection is not None:
            return branch + self.projection(identity)
        return branch + pool_and_pad(identity, self.out_channels, self.stride)


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "batch",
        shortcut: str = "avgpool_pad",
    ):
        super().__init__()
        check_norm(norm)
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"model.depth of a WideResNet must be 6n + 4 with n >= 1, e.g. 16, 28, 40 (got {depth})")
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"model.shortcut must be one of {', '.join(SHORTCUTS)} (got {shortcut!r})")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        self.stem = conv(in_channels, 16, 3, 1, norm)
        blocks, channels = [], 16
        for group, width in enumerate(widths):
            for i in range(blocks_per_group):
                stride = 2 if group > 0 and i == 0 else 1
                first = group == 0 and i == 0
                blocks.append(PreActBlock(channels, width, stride, norm, shortcut, activate_before_residual=first))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = make_norm(norm, channels)
        self.relu = nn.ReLU()
        self.classifier = Classifier(channels, num_classes)

        init_cifar_weights(self)
        if norm == "none":
            zero_init_residual_branches([block.conv2 for block in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(self.relu(self.final_norm(x)))
