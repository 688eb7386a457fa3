r"""skeleton: learn the ridge penalty of a linear regression through its training run.

Every outer step trains a linear model from zero for ``inner.steps`` full-batch gradient
steps on the training loss plus :math:`\lambda \lVert w \rVert^2` with
:math:`\lambda = 10^{\rho}`,

.. math:: w_{t+1} = w_t - \eta \big(\nabla L_T(w_t) + 2 \lambda w_t\big),

and takes one Adam step on :math:`\rho` along :math:`dL_V(w_T)/d\rho`, the exact hypergradient
of the validation loss by :func:`bilevel.hypergrad.unrolled`. The data are synthetic, drawn
from ``run.seed``: about as many features as noisy training rows, where an unpenalised fit overfits.

This is the template of a recipe folder: ``Config`` (every key read, a typo an error),
``run(config, run_dir)`` (state registered once in a :class:`~bilevel.run.RunState`, resumed
with ``run_dir.resume``, checkpointed every step), one shipped config::

    bilevel run skeleton/ridge.yaml --out runs/skeleton
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from bilevel import hypergrad
from bilevel.run import (
    CheckpointConfig,
    LoggingConfig,
    RunDir,
    RunState,
    Section,
    SkipOrAbortRunConfig,
    all_finite,
    on_nonfinite,
    resolve_device,
)
from bilevel.run.faults import triggered


class DataSection(Section):
    """The synthetic regression problem: y = x·w* + noise, w* ~ N(0, 1)."""

    features: int = Field(40, gt=0, le=10_000)
    train: int = Field(50, gt=0, le=1_000_000, description="training rows")
    val: int = Field(200, gt=0, le=1_000_000)
    test: int = Field(1000, gt=0, le=1_000_000)
    noise: float = Field(2.0, ge=0.0, description="std of the label noise")


class InnerSection(Section):
    """The inner training run, from zero weights at every outer step."""

    lr: float = Field(0.1, gt=0.0, description="gradient-descent step size η")
    steps: int = Field(200, gt=0, le=10_000, description="steps T back-propagated through")
    log10_penalty: float = Field(-3.0, ge=-10.0, le=3.0, description="initial ρ (λ = 10**ρ)")


class OuterSection(Section):
    """Adam on ρ."""

    lr: float = Field(0.1, gt=0.0)


class Config(Section):
    """skeleton's config."""

    data: DataSection = DataSection()
    inner: InnerSection = InnerSection()
    outer: OuterSection = OuterSection()
    run: SkipOrAbortRunConfig  # nan_policy skip/abort: nothing here to roll back to
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()


def _data(cfg: DataSection, seed: int, device: torch.device
          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same data on every device
    w_star = torch.randn(cfg.features, generator=g)
    out = {}
    for split in ("train", "val", "test"):
        x = torch.randn(getattr(cfg, split), cfg.features, generator=g)
        y = x @ w_star + cfg.noise * torch.randn(len(x), generator=g)
        out[split] = (x.to(device), y.to(device))
    return out


def _mse(w: torch.Tensor, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (xy[0] @ w - xy[1]).square().mean()


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Learn ρ; return the final val/test loss of a model trained with the learned penalty."""
    device, policy = resolve_device(config.run.device), config.run.nan_policy
    data = _data(config.data, config.run.seed, device)
    rho = torch.tensor(config.inner.log10_penalty, device=device, requires_grad=True)
    opt = torch.optim.Adam([rho], lr=config.outer.lr)
    state = RunState(rho=rho, outer_opt=opt)  # everything that changes; resume restores it

    def step(w: torch.Tensor, hp: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        # The gradient of L_T + λ|w|², written out, so the step is pure and differentiable.
        x, y = data["train"]
        grad = 2.0 * x.T @ (x @ w - y) / len(y) + 2.0 * 10.0 ** hp["rho"] * w
        return w - config.inner.lr * grad

    def val_loss(w: torch.Tensor, hp: dict[str, torch.Tensor]) -> torch.Tensor:
        return _mse(w, data["val"])

    w0 = torch.zeros(config.data.features, device=device)
    done = run_dir.resume(state, save_start=True)
    for outer_step in run_dir.steps(done, config.run.max_steps):
        r = hypergrad.unrolled(step, val_loss, w0, {"rho": rho}, steps=config.inner.steps,
                               check_finite=False)
        hg = r.hypergrad["rho"] * math.nan if triggered("nan_hypergrad") else r.hypergrad["rho"]
        if all_finite(hg):
            hypergrad.write_grad({"rho": hg}, {"rho": rho})
            opt.step()
            with torch.no_grad():  # λ ≤ 1 keeps the inner step stable (2λη < 2 at η ≤ 0.5)
                rho.clamp_(-10.0, 0.0)
        else:  # skip: ρ does not move this step; abort: NonFiniteError, exit 1
            on_nonfinite(run_dir, policy, step=outer_step, what="hypergradient")
        if outer_step % config.logging.every == 0 or outer_step == config.run.max_steps:
            run_dir.log(outer_step, {"val/loss": r.outer_loss.item(), "hyper/log10_penalty": rho.item()})
        run_dir.checkpoint(outer_step, state, force=outer_step == config.run.max_steps)

    w = w0
    with torch.no_grad():
        for t in range(config.inner.steps):
            w = step(w, {"rho": rho}, t)
    return {"val/loss": _mse(w, data["val"]).item(), "test/loss": _mse(w, data["test"]).item(),
            "hyper/penalty": math.pow(10.0, rho.item())}
