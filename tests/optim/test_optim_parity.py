"""Parity of the functional rules with torch.optim, in float64, for every option combination.

One declarative table maps (rule, options) to its torch.optim equivalent; every row runs
with each hyperparameter form (python float, 0-d tensor, per-tensor dict, per-element dict
with all-equal values), which must all reproduce torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from bilevel.optim import adam, sgd

STEPS = 25
FORMS = ("float", "tensor", "per_tensor", "per_element")
FLAGS = {"nesterov", "decoupled_weight_decay", "maximize", "amsgrad"}


@dataclass(frozen=True)
class Case:
    """One row: our rule with ``options`` equals ``torch_cls(**torch_kwargs)``."""

    rule: str  # "sgd" or "adam"
    options: dict[str, Any]
    torch_cls: type[torch.optim.Optimizer]
    torch_kwargs: dict[str, Any]
    # torch's SGD has no decoupled weight decay: the reference multiplies params by
    # (1 - lr * wd) itself before each SGD(weight_decay=0) step.
    pre_decay: float = 0.0
    id: str = field(default="", compare=False)


def _sgd_rows() -> list[Case]:
    rows = []
    momenta = [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
               {"momentum": 0.9, "dampening": 0.3}]
    decays = [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}]
    for mom, wd, maximize in itertools.product(momenta, decays, (False, True)):
        opts = {"lr": 0.05, **mom, **wd, "maximize": maximize}
        ref = {k: v for k, v in opts.items() if k != "decoupled_weight_decay"}
        pre = 0.0
        if wd.get("decoupled_weight_decay"):
            ref["weight_decay"], pre = 0.0, 0.05 * 0.1
        rows.append(Case("sgd", opts, torch.optim.SGD, ref, pre, id="sgd-" + _name(opts)))
    return rows


def _adam_rows() -> list[Case]:
    rows = []
    decays = [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}]
    for wd, amsgrad, maximize in itertools.product(decays, (False, True), (False, True)):
        opts = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, **wd,
                "amsgrad": amsgrad, "maximize": maximize}
        ref = {k: v for k, v in opts.items() if k != "decoupled_weight_decay"}
        cls = torch.optim.AdamW if wd.get("decoupled_weight_decay") else torch.optim.Adam
        ref.setdefault("weight_decay", 0.0)  # AdamW's default is 0.01
        rows.append(Case("adam", opts, cls, ref, id="adam-" + _name(opts)))
    return rows


def _name(opts: dict[str, Any]) -> str:
    parts = [k if v is True else f"{k}={v}" for k, v in opts.items()
             if v is not False and k not in ("lr", "betas", "eps")]
    return ",".join(parts) or "plain"


TABLE = _sgd_rows() + _adam_rows()
RULES = {"sgd": sgd, "adam": adam}


def _problem() -> tuple[dict[str, torch.Tensor], Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "b": torch.randn(3, generator=g, dtype=torch.float64)}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (torch.tanh(x @ p["w"].T + p["b"]) - y).pow(2).mean()

    return params, loss


def _in_form(value: float, form: str, params: dict[str, torch.Tensor]) -> Any:
    if form == "float":
        return value
    if form == "tensor":
        return torch.tensor(value, dtype=torch.float64)
    if form == "per_tensor":
        return {n: torch.tensor(value, dtype=torch.float64) for n in params}
    return {n: torch.full_like(p, value) for n, p in params.items()}


def _hparams(options: dict[str, Any], form: str, params: dict[str, torch.Tensor]) -> dict:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in FLAGS:
            out[key] = value
        elif key == "betas":
            out[key] = tuple(_in_form(b, form, params) for b in value)
        else:
            out[key] = _in_form(value, form, params)
    return out


def _reference(case: Case, params0: dict[str, torch.Tensor], loss) -> list[dict]:
    params = {n: p.clone().requires_grad_(True) for n, p in params0.items()}
    opt = case.torch_cls(list(params.values()), **case.torch_kwargs)
    trajectory = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss(params).backward()
        if case.pre_decay:
            with torch.no_grad():
                for p in params.values():
                    p.mul_(1 - case.pre_decay)
        opt.step()
        trajectory.append({n: p.detach().clone() for n, p in params.items()})
    return trajectory


def test_table_covers_every_combination():
    assert len([c for c in TABLE if c.rule == "sgd"]) == 4 * 3 * 2
    assert len([c for c in TABLE if c.rule == "adam"]) == 3 * 2 * 2
    assert len({c.id for c in TABLE}) == len(TABLE)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", TABLE, ids=lambda c: c.id)
def test_matches_torch_optim(case: Case, form: str):
    params0, loss = _problem()
    expected = _reference(case, params0, loss)
    rule = RULES[case.rule]
    hparams = _hparams(case.options, form, params0)
    params, state = dict(params0), rule.init(params0)
    for t in range(STEPS):
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        values = torch.autograd.grad(loss(leaves), list(leaves.values()))
        grads = dict(zip(leaves, values, strict=True))
        params, state = rule.step(params, grads, state, **hparams)
        for n in params:
            torch.testing.assert_close(params[n], expected[t][n], rtol=1e-10, atol=1e-12,
                                       msg=lambda m, t=t, n=n: f"step {t}, {n}: {m}")
    assert int(state.step) == STEPS and state.step.dtype == torch.int64
