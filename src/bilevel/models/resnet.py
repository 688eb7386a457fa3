"""CIFAR-style ResNet-18/34 (the Commentaries evaluation students).

Source: ``googleinterns/commentaries`` ``models.py`` (the widely copied ``kuangliu/pytorch-cifar``
ResNet): a 3x3 stride-1 stem without max-pooling, stages of ``BasicBlock``s with 64, 128, 256,
512 channels (strides 1, 2, 2, 2), global average pooling, a linear layer, ``log_softmax``.
Convolutions use Kaiming-normal (fan-out) init, BatchNorm starts at (1, 0).

Parameter counts (3 input channels): ResNet-18 11,173,962 (10 classes) / 11,220,132 (100);
ResNet-34 21,282,122 / 21,328,292.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with ``blocks`` BasicBlocks per stage.

    Args:
        blocks: blocks per stage, ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for ResNet-34.
        num_classes: outputs.
        in_channels: image channels.

    Shapes:
        ``[n, C, 32, 32]`` -> ``[n, num_classes]`` log-probabilities.
    """

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, *, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)  # [n, 512, H/8, W/8]
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # [n, 512]
        return F.log_softmax(self.linear(out), dim=1)


def resnet18(num_classes: int = 10, *, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-18 (11.17 M parameters for 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels=in_channels)


def resnet34(num_classes: int = 10, *, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-34 (21.28 M parameters for 10 classes)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels=in_channels)
