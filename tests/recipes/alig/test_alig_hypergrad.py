"""AliG as the INNER optimiser of a hypergradient step: the functional ``alig.step`` inside a
``hypergrad.unrolled`` step map, as a recipe writes it. The hypergradient of the validation
loss with respect to ``max_lr`` and ``momentum`` must match central finite differences in
float64 (real data: scikit-learn's digits, an MLP called through ``functional.call``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bilevel import hypergrad
from bilevel.functional import call, module_state
from bilevel.models import MLP
from bilevel.optim import alig

D = torch.float64
X, Y = (torch.tensor(a) for a in load_digits(return_X_y=True))
X = (X / 16).to(D)
G = torch.Generator().manual_seed(0)
PERM = torch.randperm(len(X), generator=G)
TRAIN, VAL = PERM[:1200], PERM[1200:1500]
BATCHES = TRAIN[torch.randperm(len(TRAIN), generator=G)].split(64)
STEPS = 8

torch.manual_seed(0)
MODEL = MLP([64, 16, 10], "tanh").to(D)
PARAMS0, BUFFERS = module_state(MODEL)


def ce(params: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    logits, _ = call(MODEL, params, BUFFERS, X[idx])
    return F.cross_entropy(logits, Y[idx])


def step(state: tuple[dict[str, torch.Tensor], alig.AliGState], hp: dict[str, torch.Tensor],
         t: int) -> tuple[dict[str, torch.Tensor], alig.AliGState]:
    """One AliG step on minibatch t; γ depends on the loss and gradient (differentiated)."""
    params, opt_state = state
    grads, loss = torch.func.grad_and_value(ce)(params, BATCHES[t])
    return alig.step(params, grads, opt_state, loss=loss, max_lr=hp["max_lr"],
                     momentum=hp["momentum"])


def val_loss(state: tuple[dict[str, torch.Tensor], alig.AliGState],
             hp: dict[str, torch.Tensor]) -> torch.Tensor:
    return ce(state[0], VAL)


def outer(max_lr: float, momentum: float) -> hypergrad.HypergradResult:
    hp = {"max_lr": torch.tensor(max_lr, dtype=D, requires_grad=True),
          "momentum": torch.tensor(momentum, dtype=D, requires_grad=True)}
    state0 = (dict(PARAMS0), alig.init(PARAMS0))
    return hypergrad.unrolled(step, val_loss, state0, hp, steps=STEPS)


def clip_margins(max_lr: float, momentum: float) -> list[float]:
    """``γ_u / max_lr - 1`` at every step: away from 0 means away from AliG's kink."""
    state = (dict(PARAMS0), alig.init(PARAMS0))
    hp = {"max_lr": torch.tensor(max_lr, dtype=D), "momentum": torch.tensor(momentum, dtype=D)}
    margins = []
    for t in range(STEPS):
        state = step(state, hp, t)
        margins.append(float(state[1].step_size_unclipped) / max_lr - 1)
    return margins


# max_lr 2.0 is active in some steps and not in others, so both gradients are informative.
BASE = {"max_lr": 2.0, "momentum": 0.5}


def test_the_cap_is_active_in_some_steps_and_not_others() -> None:
    margins = clip_margins(**BASE)
    assert any(m > 0.01 for m in margins) and any(m < -0.01 for m in margins), margins
    assert min(abs(m) for m in margins) > 1e-3  # finite differences never cross the kink


@pytest.mark.parametrize("wrt", ["max_lr", "momentum"])
def test_hypergradient_through_alig_matches_central_differences(wrt: str) -> None:
    analytic = outer(**BASE).hypergrad[wrt]
    h = 1e-6
    plus = outer(**{**BASE, wrt: BASE[wrt] + h}).outer_loss
    minus = outer(**{**BASE, wrt: BASE[wrt] - h}).outer_loss
    numeric = (plus - minus) / (2 * h)
    assert abs(float(analytic)) > 1e-4  # the test is not vacuous
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)


def test_a_small_step_against_the_max_lr_hypergradient_lowers_the_validation_loss() -> None:
    r = outer(**BASE)
    g = float(r.hypergrad["max_lr"])
    better = outer(max_lr=BASE["max_lr"] - 0.05 * (1 if g > 0 else -1), momentum=BASE["momentum"])
    assert better.outer_loss < r.outer_loss
