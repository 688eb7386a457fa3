"""toy_hyperlr: learn the SGD learning rate of a small regressor by hypergradient descent.

Baydin et al.'s greedy hypergradient on scikit-learn's bundled ``load_diabetes`` (442 rows,
10 features; no download). Every step makes ``hypergrad.steps`` SGD updates of the weights
``w`` with learning rate ``lr = 10**λ``; the last one is differentiated: the outer loss is the
full validation loss after that update, ``L_V(w - lr ∇L_T(w))``, and ``λ`` takes one step of
the outer optimiser along ``dL_V/dλ``. Minibatch order comes from a checkpointable
``IndexSampler`` and dropout from the global torch RNG, so resume must restore both.

Run it::

    bilevel run toy_hyperlr/diabetes_mlp.yaml --out runs/toy
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from bilevel import hypergrad
from bilevel.run import (
    Accessor,
    CheckpointConfig,
    Greedy,
    LoggingConfig,
    ModelConfig,
    OuterOptimConfig,
    RunConfig,
    RunDir,
    RunState,
    Section,
    all_finite,
    on_nonfinite,
    resolve_device,
)
from bilevel.run.faults import kill_point, triggered
from bilevel.run.nan import ROLLBACK_FACTOR
from bilevel.run.schema import MAX_BATCH, MAX_SEED

try:
    from bilevel.data import IndexSampler
except ImportError:  # bilevel.data does not re-export it (yet)
    from bilevel.data._sampler import IndexSampler


class DataSection(Section):
    """scikit-learn's bundled diabetes data (no download), split 250/96/96 by ``split_seed``."""

    name: Literal["diabetes"] = "diabetes"
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(32, gt=0, le=MAX_BATCH)


class InnerSection(Section):
    """Plain SGD on the regressor; ``lr`` is the learned value's start."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0.0)


class HParamSection(Section):
    """The one learned value: a scalar log10 learning rate, clipped to ``[low, high]``."""

    name: Literal["lr"] = "lr"
    granularity: Literal["scalar"] = "scalar"
    transform: Literal["log10"] = "log10"
    low: float = -6.0
    high: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> HParamSection:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Config(Section):
    """toy_hyperlr's config: data, model, inner SGD, learned log10-lr, outer optimiser."""

    data: DataSection = DataSection()
    model: ModelConfig = ModelConfig(name="linear")
    inner: InnerSection = InnerSection()
    hparam: HParamSection = HParamSection()
    outer: OuterOptimConfig = OuterOptimConfig(name="adam", lr=0.02)
    hypergrad: Greedy = Greedy()
    run: RunConfig
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @field_validator("model")
    @classmethod
    def _mlp(cls, v: ModelConfig) -> ModelConfig:
        if v.name not in ("linear", "mlp"):
            raise ValueError(f"model.name must be 'linear' or 'mlp', got {v.name!r}")
        return v


def _splits(cfg: DataSection, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    from sklearn.datasets import load_diabetes  # optional dependency, imported when used

    x_np, y_np = load_diabetes(return_X_y=True)
    x = torch.as_tensor(x_np, dtype=torch.float32)
    y = torch.as_tensor(y_np, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.split_seed))
    parts = {"train": perm[:250], "val": perm[250:346], "test": perm[346:]}
    return {k: (x[i].to(device), y[i].unsqueeze(1).to(device)) for k, i in parts.items()}


def _model(cfg: ModelConfig) -> nn.Module:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[cfg.activation]
    layers: list[nn.Module] = []
    width = 10
    for h in cfg.hidden if cfg.name == "mlp" else []:
        layers += [nn.Linear(width, h), act(), nn.Dropout(cfg.dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train, learning ``log10 lr``; return final train/val/test losses and the learned lr."""
    device = resolve_device(config.run.device)
    data = _splits(config.data, device)
    model = _model(config.model).to(device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    log_lr = torch.tensor(math.log10(config.inner.lr), device=device, requires_grad=True)
    opt_cls = torch.optim.Adam if config.outer.name == "adam" else torch.optim.SGD
    opt = opt_cls([log_lr], lr=config.outer.lr)
    sampler = IndexSampler(len(data["train"][0]), config.data.batch_size, seed=config.run.seed)
    extra = {"rollbacks": 0, "lr_scale": 1.0}  # the outer lr is config.outer.lr * lr_scale

    def set_params(w: dict[str, torch.Tensor]) -> None:
        nonlocal params
        params = dict(w)

    # params is rebound every step, so it is set, not copied into. The scaled outer lr
    # travels in the optimiser's own state.
    state = RunState(params=Accessor(get=lambda: dict(params), set=set_params), log_lr=log_lr,
                     outer_opt=opt, sampler=sampler, **Accessor.items(extra))

    def loss_of(m: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train: bool) -> torch.Tensor:
        m.train(train)
        return ((m(x) - y) ** 2).mean()

    batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's batch, set in the loop
    # The inner SGD step and the validation loss, from the module kit (lr = 10 ** log_lr).
    prob = hypergrad.problem(model, lambda m, hp, x, y: loss_of(m, x, y, train=True),
                             lambda m, hp: loss_of(m, *data["val"], train=False),
                             hparams={"log_lr": log_lr}, batches=lambda t: batch,
                             lr=lambda hp: 10.0 ** hp["log_lr"])

    def state_of(w: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**prob.state, "params": w}  # no momentum: the rule's state stays at init

    def loss_at(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
        """The eval-mode loss of the weights ``w`` (copied into the model) on ``(x, y)``."""
        hypergrad.load_state(model, state_of(w))
        with torch.no_grad():
            return loss_of(model, x, y, train=False).item()

    done = run_dir.resume(state, save_start=True)  # steps done by the trajectory followed
    while True:
        for step in run_dir.steps(done, config.run.max_steps):
            for i in range(config.hypergrad.steps):
                x_idx = next(sampler)
                batch = (data["train"][0][x_idx], data["train"][1][x_idx])
                kill_point("inner")
                hp = {"log_lr": log_lr.detach()}
                if i < config.hypergrad.steps - 1:
                    new = prob.step(state_of(params), hp, step)["params"]
                    params = {k: v.detach() for k, v in new.items()}
            r = hypergrad.from_config(config.hypergrad)(
                prob.step, prob.outer_loss, state_of(params), {"log_lr": log_lr}, start=step,
                check_finite=False)
            hg = r.hypergrad["log_lr"]
            if triggered("nan_hypergrad"):
                hg = hg * math.nan
            finite = all_finite(hg, r.state["params"])
            if not finite and on_nonfinite(run_dir, config.run.nan_policy, step=step,
                                           what="hypergradient",
                                           rollbacks=extra["rollbacks"]) == "rollback":
                bad_step = step
                break
            if finite:  # skip: neither the weights nor the lr move this step
                params = r.state["params"]
                hypergrad.write_grad({"log_lr": hg}, {"log_lr": log_lr},
                                     max_norm=config.outer.grad_clip)
                opt.step()
                with torch.no_grad():
                    log_lr.clamp_(config.hparam.low, config.hparam.high)
            kill_point("hyper")
            if step % config.logging.every == 0 or step == config.run.max_steps:
                run_dir.log(step, {"train/loss": loss_at(params, *batch),
                                   "val/loss": r.outer_loss.item(),
                                   "hyper/lr": 10.0 ** log_lr.item(),
                                   "hypergrad/log10_lr": hg.item()})
            run_dir.checkpoint(step, state, force=step == config.run.max_steps)
        else:
            break
        # rollback: back to the last checkpoint (step 0 is always saved), smaller hyper lr
        done = run_dir.resume(state)
        extra.update(rollbacks=extra["rollbacks"] + 1, lr_scale=extra["lr_scale"] * ROLLBACK_FACTOR)
        for group in opt.param_groups:
            group["lr"] = config.outer.lr * extra["lr_scale"]
        # The restore cut the metrics back, so this event also records what happened.
        run_dir.event(done, "rollback", nonfinite_step=bad_step, what="hypergradient",
                      outer_lr=config.outer.lr * extra["lr_scale"])
        run_dir.checkpoint(done, state, force=True)

    final = {f"{k}/loss": loss_at(params, *xy) for k, xy in data.items()}
    return {**final, "hyper/lr": 10.0 ** log_lr.item()}
