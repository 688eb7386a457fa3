"""Learned optimiser hyperparameters: moved to :mod:`bilevel.optim.hyperparameters` (the
online optimiser :class:`bilevel.hypergrad.HyperSGD` needs them below ``meta``); this name
stays for existing imports."""

from bilevel.optim.hyperparameters import (
    TRANSFORMS,
    Granularity,
    HParamSpec,
    HValue,
    Hyperparameters,
    RawTree,
    Transform,
)

__all__ = ["TRANSFORMS", "Granularity", "HParamSpec", "HValue", "Hyperparameters", "RawTree",
           "Transform"]
