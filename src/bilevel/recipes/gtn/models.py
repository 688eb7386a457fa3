"""Generative Teaching Network models (Such et al., ICML 2020) as implemented by ``GoodAI/GTN``.

Source: ``GoodAI/GTN`` ``gtn/models`` (``MNISTLearner``, ``MNISTTeacher``).

* :class:`GTNLearner`: ``Conv3x3(1->64) - LeakyReLU(0.1) - BN - MaxPool2 - Conv3x3(64->128) -
  LeakyReLU(0.1) - BN - MaxPool2 - Linear(3200->10) - BN1d - log_softmax`` (no padding;
  BN momentum 0.1). 106,910 parameters with the default 64/128 filters.
* :class:`GTNTeacher`: ``cat(z, onehot(y)) - Linear(->1024) - LeakyReLU(0.1) - BN1d -
  Linear(->F*S*S) - LeakyReLU(0.1) - reshape [F, S, S] - BN2d - upsample to 28 - Conv3x3(F->64)
  - BN - LeakyReLU - Conv3x3(64->1) - BN - LeakyReLU - tanh``, Kaiming-normal init on the
  linear layers. The seed code uses S = 28, F = 128: its second linear layer alone has
  102.8 M weights (:meth:`GTNTeacher.original`: 103,014,403 parameters, ~412 MB in float32).
  The paper describes a smaller map upsampled to 28x28; the CPU-sized default here is S = 7,
  F = 64, bilinear x4 upsampling: 3,331,011 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GTNLearner(nn.Module):
    """The learner trained on synthetic data (MNIST-shaped input).

    Shapes:
        ``[n, 1, 28, 28]`` -> ``[n, num_classes]`` log-probabilities.
    """

    def __init__(self, num_classes: int = 10, *, conv1_filters: int = 64, conv2_filters: int = 128,
                 in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv1_filters, 3), nn.LeakyReLU(0.1), nn.BatchNorm2d(conv1_filters),
            nn.MaxPool2d(2),
            nn.Conv2d(conv1_filters, conv2_filters, 3), nn.LeakyReLU(0.1), nn.BatchNorm2d(conv2_filters),
            nn.MaxPool2d(2),
        )
        side = ((image_size - 2) // 2 - 2) // 2  # 28 -> 26 -> 13 -> 11 -> 5
        self.fc = nn.Linear(conv2_filters * side * side, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.bn(self.fc(self.features(x).flatten(1))), dim=1)


class GTNTeacher(nn.Module):
    """The generator of synthetic training images, conditioned on a label.

    Args:
        noise_dim: size of ``z`` (the seed's ``teacher_input_size``, 64).
        num_classes: labels the generator is conditioned on.
        fc1_size: width of the first linear layer (1024).
        map_filters: channels ``F`` of the first spatial map (seed 128).
        map_size: side ``S`` of the first spatial map (seed 28; default 7, then upsampled).
        conv1_filters: channels of the first convolution (64).
        out_size: output side (28); ``out_size`` must be a multiple of ``map_size``.
        out_channels: output image channels (1).

    Shapes:
        ``forward(z [n, noise_dim], y [n] int64)`` -> images ``[n, out_channels, out_size,
        out_size]`` in ``(-1, 1)``.
    """

    def __init__(self, noise_dim: int = 64, num_classes: int = 10, *, fc1_size: int = 1024,
                 map_filters: int = 64, map_size: int = 7, conv1_filters: int = 64,
                 out_size: int = 28, out_channels: int = 1) -> None:
        super().__init__()
        if out_size % map_size:
            raise ValueError(f"out_size ({out_size}) must be a multiple of map_size ({map_size})")
        self.num_classes, self.map_filters, self.map_size, self.out_size = num_classes, map_filters, map_size, out_size
        self.fc1 = nn.Linear(noise_dim + num_classes, fc1_size)
        self.bn1 = nn.BatchNorm1d(fc1_size)
        self.fc2 = nn.Linear(fc1_size, map_filters * map_size * map_size)
        self.bn2 = nn.BatchNorm2d(map_filters)
        self.conv1 = nn.Conv2d(map_filters, conv1_filters, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(conv1_filters)
        self.conv2 = nn.Conv2d(conv1_filters, out_channels, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(out_channels)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, a=0.1, nonlinearity="leaky_relu")

    @classmethod
    def original(cls, noise_dim: int = 64, num_classes: int = 10) -> GTNTeacher:
        """The seed code's teacher: a 128x28x28 map, no upsampling (103,014,403 parameters)."""
        return cls(noise_dim, num_classes, map_filters=128, map_size=28)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], dim=1)  # [n, noise+classes]
        h = self.bn1(F.leaky_relu(self.fc1(h), 0.1))  # [n, fc1]
        h = F.leaky_relu(self.fc2(h), 0.1).view(-1, self.map_filters, self.map_size, self.map_size)
        h = self.bn2(h)  # [n, F, S, S]
        if self.map_size != self.out_size:
            h = F.interpolate(h, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        h = F.leaky_relu(self.bn3(self.conv1(h)), 0.1)  # [n, conv1, 28, 28]
        h = F.leaky_relu(self.bn4(self.conv2(h)), 0.1)  # [n, 1, 28, 28]
        return torch.tanh(h)
