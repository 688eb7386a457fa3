"""bilevel: learn how a network should be trained, by hypergradients.

Public entry points (imported lazily so ``import bilevel`` stays light):

* ``bilevel.hypergrad``: the engine (unrolled, forward, implicit, one-pass, greedy) and the
  module kit (``hypergrad.problem``, ``hypergrad.write_grad``).
* ``bilevel.optim``: differentiable update rules (SGD, Adam/AdamW, AliG) and ``AliG``.
* ``bilevel.HyperSGD``: SGD that learns its own lr / weight decay / momentum while it trains.
* ``bilevel.AliG``: the AliG ``torch.optim.Optimizer``.
* ``bilevel.MetaOptimizer``: AuxiLearn's implicit-hypergradient meta-optimiser.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AliG": ("bilevel.optim", "AliG"),
    "HyperSGD": ("bilevel.hypergrad", "HyperSGD"),
    "MetaOptimizer": ("bilevel.hypergrad", "MetaOptimizer"),
    "HypergradWarning": ("bilevel.errors", "HypergradWarning"),
}
_SUBPACKAGES = ("functional", "hypergrad", "meta", "optim", "tree")

__all__ = ["AliG", "HyperSGD", "HypergradWarning", "MetaOptimizer", "__version__", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBPACKAGES:  # ``import bilevel; bilevel.hypergrad`` without an eager import
        return importlib.import_module(f"bilevel.{name}")
    raise AttributeError(f"module 'bilevel' has no attribute {name!r}")
