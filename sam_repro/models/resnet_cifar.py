"""CIFAR ResNets of He et al. (2016), section 4.2: ResNet-8/20/32/44/56/110.

depth = 6n + 2: a 3x3 stem conv to 16 channels with BN-ReLU, three stages of n post-activation basic blocks
(conv3x3-BN-ReLU-conv3x3-BN, add, ReLU) with 16, 32, 64 channels, global average pooling and the dense layer.
Shortcuts are option A of the paper: identity, and where the shape changes a stride-2 subsampling with zero
channels appended, so the network has no projection parameters (ResNet-32: 0.46 M, ResNet-110: 1.7 M).
ResNet-32 is the network of the paper's label-noise experiment (Table 4, after Jiang et al. 2019); ResNet-8/20
are the small networks for the m-sharpness study and CPU runs.
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


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride, norm)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, 1, norm)
        self.norm2 = make_norm(norm, out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A: subsampling matches a stride-2 'SAME' conv on any size (7 -> 4).
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(branch + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, norm: str = "batch"):
        super().__init__()
        check_norm(norm)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.depth of a CIFAR ResNet must be 6n + 2 with n >= 1, e.g. 20, 32 (got {depth})")
        blocks_per_stage = (depth - 2) // 6

        self.stem = nn.Sequential(conv(in_channels, 16, 3, 1, norm), make_norm(norm, 16), nn.ReLU())
        blocks, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, 2 if stage > 0 and i == 0 else 1, norm))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = Classifier(channels, num_classes)

        init_cifar_weights(self)
        if norm == "none":
            zero_init_residual_branches([block.conv2 for block in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(x)))
