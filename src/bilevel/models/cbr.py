"""The Commentaries CBR networks (Raghu et al., ICLR 2021): student and teacher.

Source: ``googleinterns/commentaries`` ``models.py`` (``ConvNetStudent``, ``ConvNetTeacher``
"curr", ``ConvNetTeacher2`` "nocurr"). Trunk: ``Conv(c->32, k5, s2, p2) - BN - ReLU -
MaxPool(3, s2) - Conv(32->64, k3, s2, p2) - BN - ReLU - MaxPool(3, s2)``; flattened size 64 for
28x28 inputs and 256 for 32x32. PyTorch's default init (as the seed).

Parameter counts: student 20,170 (MNIST), 23,690 (CIFAR-10), 46,820 (CIFAR-100); teacher
with the iteration channel 20,385 (MNIST, 2 input channels) / 22,177 (CIFAR, 4); without it
19,585 / 21,377.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _trunk(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(32, 64, 3, stride=2, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
    )


def _flat_size(trunk: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(trunk.eval()(torch.zeros(1, in_channels, image_size, image_size)).numel())


class CBRStudent(nn.Module):
    """The student CNN: trunk -> Linear -> log-probabilities.

    Args:
        in_channels: 1 (MNIST) or 3 (CIFAR).
        num_classes: outputs.
        image_size: 28 or 32 (sets the flattened size: 64 or 256).

    Shapes:
        ``[n, C, H, W]`` -> ``[n, num_classes]`` log-probabilities (``log_softmax``, as the seed;
        ``F.cross_entropy`` on them equals ``F.nll_loss``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, image_size: int = 28) -> None:
        super().__init__()
        self.features = _trunk(in_channels)
        self.fc = nn.Linear(_flat_size(self.features, in_channels, image_size), num_classes)
        self.features.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(self.features(x).flatten(1)), dim=1)


class CBRTeacher(nn.Module):
    """The commentary (example-weighting) teacher: trunk -> Linear -> sigmoid, one weight per example.

    Args:
        in_channels: image channels (the iteration channel is added on top).
        image_size: 28 or 32.
        iteration_channel: append a constant channel holding the training progress
            (the seed's "curr" teacher); ``False`` gives "nocurr".

    Shapes:
        ``forward(x [n, C, H, W], progress)`` -> ``[n, 1]`` in ``(0, 1)``. ``progress`` is a float
        or a tensor broadcastable to ``[n]``; the seed passes ``inner_step / inner_steps``.
    """

    def __init__(self, in_channels: int = 1, *, image_size: int = 28, iteration_channel: bool = True) -> None:
        super().__init__()
        self.iteration_channel = iteration_channel
        c = in_channels + int(iteration_channel)
        self.features = _trunk(c)
        self.fc = nn.Linear(_flat_size(self.features, c, image_size), 1)
        self.features.train()

    def forward(self, x: torch.Tensor, progress: float | torch.Tensor | None = None) -> torch.Tensor:
        if self.iteration_channel:
            if progress is None:
                raise ValueError("this teacher has an iteration channel: pass progress=step/steps")
            p = torch.as_tensor(progress, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
            x = torch.cat([x, p.expand(x.shape[0], 1, *x.shape[2:])], dim=1)  # [n, C+1, H, W]
        return torch.sigmoid(self.fc(self.features(x).flatten(1)))  # [n, 1]
