"""Plain ``nn.Module`` models from the seed papers, usable with ``torch.func.functional_call``.

Each class documents its source and parameter count. This package imports nothing from
``bilevel``.
"""

from bilevel.models.cbr import CBRStudent, CBRTeacher
from bilevel.models.dnc import DNC
from bilevel.models.lstm import LSTMLanguageModel
from bilevel.models.mlp import ACTIVATIONS, MLP
from bilevel.models.resnet import ResNet, resnet18, resnet34

__all__ = [
    "ACTIVATIONS",
    "DNC",
    "MLP",
    "CBRStudent",
    "CBRTeacher",
    "LSTMLanguageModel",
    "ResNet",
    "resnet18",
    "resnet34",
]
