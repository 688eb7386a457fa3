"""bilevel: learn how a network should be trained, by hypergradients.

Public entry points (imported lazily so ``import bilevel`` stays light):

* ``bilevel.hypergrad``: the engine (unrolled, forward, implicit, one-pass, greedy).
* ``bilevel.optim``: differentiable update rules (SGD, Adam/AdamW, AliG) and ``AliG``.
* ``bilevel.AliG``: the AliG ``torch.optim.Optimizer``.
* ``bilevel.MetaOptimizer``: AuxiLearn's implicit-hypergradient meta-optimiser.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AliG": ("bilevel.optim", "AliG"),
    "MetaOptimizer": ("bilevel.hypergrad", "MetaOptimizer"),
    "HypergradWarning": ("bilevel.errors", "HypergradWarning"),
}

__all__ = ["AliG", "HypergradWarning", "MetaOptimizer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bilevel' has no attribute {name!r}")
