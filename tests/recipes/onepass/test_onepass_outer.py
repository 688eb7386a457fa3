"""onepass's outer step: Adam on the raw hyperparameters, the log10-lr clip, and the
non-finite hypergradient policies (skip leaves everything as it was; abort raises)."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel.errors import NonFiniteError
from bilevel.recipes.onepass.recipe import Config, hyper_update, hyperparameters, outer_optimizer


def _setup(lr: float = 0.5):
    cfg = Config(inner={"lr": lr, "weight_decay": 1e-4, "momentum": 0.5},
                 algorithm={"name": "ours", "learn": ["lr", "weight_decay", "momentum"]})
    hp = hyperparameters(cfg, {"w": torch.zeros(3)})
    return hp, outer_optimizer(hp, cfg.algorithm)


def test_adam_moves_each_raw_hyperparameter_by_outer_lr_against_the_gradient_sign() -> None:
    hp, outer = _setup(lr=1e-3)
    before = [p.detach().clone() for p in hp.learned()]
    hg = [torch.tensor(2.0), torch.tensor(-3.0), torch.tensor(0.5)]
    assert hyper_update(hp, outer, hg, nan_policy="skip", step=1)
    moved = [float(p.detach() - b) for p, b in zip(hp.learned(), before, strict=True)]
    assert moved == pytest.approx([-0.05, 0.05, -0.05], rel=1e-4)  # Adam's first step: ±lr


def test_log10_lr_is_clipped_to_one() -> None:
    hp, outer = _setup(lr=0.99)
    assert hyper_update(hp, outer, [torch.tensor(-1.0), torch.tensor(0.0), torch.tensor(0.0)],
                        nan_policy="skip", step=1)
    assert float(hp.values()["lr"]) == pytest.approx(1.0)


def test_non_finite_hypergradient_is_skipped_or_aborts() -> None:
    hp, outer = _setup()
    before = [p.detach().clone() for p in hp.learned()]
    bad = [torch.tensor(math.nan), torch.tensor(1.0), torch.tensor(1.0)]
    assert not hyper_update(hp, outer, bad, nan_policy="skip", step=4)
    assert all(torch.equal(p, b) for p, b in zip(hp.learned(), before, strict=True))
    assert not outer.state  # Adam's moments untouched too
    with pytest.raises(NonFiniteError, match=r"hyper-step 4.*run\.nan_policy: skip"):
        hyper_update(hp, outer, bad, nan_policy="abort", step=4)
    assert hyper_update(hp, None, None, nan_policy="abort", step=4)  # nothing learned
