"""Shake-Shake ResNet (Gastaldi 2017) as in the official SAM code (`sam_jax/models/wide_resnet_shakeshake.py`).

The paper's "Shake-Shake (26 2x96d)", called "WRN 26-2x6 ShakeShake" in its appendix and `WideResnet28x6_ShakeShake`
in the official code: depth 26 = 2 + 6 * 4 blocks, two residual branches per block, 96 / 192 / 384 channels. It has
26.2 M parameters for 10 classes.

Network: 3x3 stem conv to 16 channels + BN; three groups of (depth - 2) / 6 blocks with width, 2 * width,
4 * width channels (the last two groups start with stride 2); ReLU, global average pooling, dense layer.
Block: two branches ReLU-conv3x3-BN-ReLU-conv3x3-BN mixed by `ShakeShake`, added to the shortcut. Where the width
changes the shortcut is Gastaldi's: two 1x1 convs, each on a stride-subsampled input, the second offset by one
pixel, concatenated and batch-normalised.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam_repro.errors import ConfigError
from sam_repro.models.layers import (
    Classifier,
    check_norm,
    conv,
    init_cifar_weights,
    make_norm,
    zero_init_residual_branches,
)
from sam_repro.models.shake import ShakeShake


class GastaldiShortcut(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.stride = stride
        self.conv_a = conv(in_channels, out_channels // 2, 1, 1, norm)
        self.conv_b = conv(in_channels, out_channels // 2, 1, 1, norm)
        self.norm = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        path_a = x[:, :, ::s, ::s]
        # Shifted by one pixel right and down (zero fill), so the two paths see complementary pixels after subsampling.
        path_b = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:][:, :, ::s, ::s]
        return self.norm(torch.cat([self.conv_a(path_a), self.conv_b(path_b)], dim=1))


class ShakeShakeBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.branch_a = self._branch(in_channels, out_channels, stride, norm)
        self.branch_b = self._branch(in_channels, out_channels, stride, norm)
        self.shake = ShakeShake()
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = GastaldiShortcut(in_channels, out_channels, stride, norm)

    @staticmethod
    def _branch(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
        return nn.Sequential(
            nn.ReLU(),
            conv(in_channels, out_channels, 3, stride, norm),
            make_norm(norm, out_channels),
            nn.ReLU(),
            conv(out_channels, out_channels, 3, 1, norm),
            make_norm(norm, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return identity + self.shake(self.branch_a(x), self.branch_b(x))


class ShakeShakeResNet(nn.Module):
    def __init__(
        self,
        depth: int = 26,
        width: int = 96,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "batch",
    ):
        super().__init__()
        check_norm(norm)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.depth of a Shake-Shake ResNet must be 6n + 2 with n >= 1, e.g. 26 (got {depth})")
        if width % 2:
            raise ConfigError(f"model.width of a Shake-Shake ResNet must be even (the shortcut halves it; got {width})")
        blocks_per_group = (depth - 2) // 6

        self.stem = nn.Sequential(conv(in_channels, 16, 3, 1, norm), make_norm(norm, 16))
        blocks, channels = [], 16
        for group, group_width in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks_per_group):
                blocks.append(ShakeShakeBlock(channels, group_width, 2 if group > 0 and i == 0 else 1, norm))
                channels = group_width
        self.blocks = nn.Sequential(*blocks)
        self.relu = nn.ReLU()
        self.classifier = Classifier(channels, num_classes)

        init_cifar_weights(self)
        if norm == "none":
            zero_init_residual_branches([b.branch_a[-2] for b in blocks] + [b.branch_b[-2] for b in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.relu(self.blocks(self.stem(x))))
