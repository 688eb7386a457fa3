"""Multi-layer perceptron with any widths (Clarke et al.'s UCI and Fashion-MNIST models).

Source: ``rmclarke/OptimisingWeightUpdateHyperparameters`` ``models.py`` (MLP ``[d_in, 50, 1]``
with ReLU for UCI, ``[784, 50, 10]`` for Fashion-MNIST), PyTorch's default ``nn.Linear`` init.

Parameter count: ``sum(w_i * w_{i+1} + w_{i+1})``; e.g. ``MLP([8, 50, 1])`` has 501 and
``MLP([784, 50, 10])`` has 39,760.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "softplus": nn.Softplus, "identity": nn.Identity,
}


class MLP(nn.Module):
    """``Linear -> act -> ... -> Linear`` on flattened inputs; the last layer has no activation.

    Args:
        widths: layer widths including input and output, e.g. ``[784, 50, 10]``.
        activation: a name in :data:`ACTIVATIONS`.
        batch_norm: put ``BatchNorm1d`` after each hidden linear layer (Clarke et al.'s variant).

    Shapes:
        ``[n, *]`` with ``prod(*) == widths[0]`` -> ``[n, widths[-1]]`` (raw outputs: logits or
        regression values).

    Example:
        >>> MLP([8, 50, 1])(torch.zeros(4, 8)).shape
        torch.Size([4, 1])
    """

    def __init__(self, widths: Sequence[int], activation: str = "relu", *, batch_norm: bool = False) -> None:
        super().__init__()
        if len(widths) < 2 or any(int(w) <= 0 for w in widths):
            raise ValueError(f"widths needs >= 2 positive sizes (input ... output), got {list(widths)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(int(a), int(b)))
            if i < len(widths) - 2:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(int(b)))
                layers.append(ACTIVATIONS[activation]())
        self.widths = tuple(int(w) for w in widths)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # [n, widths[-1]]
