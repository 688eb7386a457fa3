"""onepass: tune learning rate, weight decay and momentum *during* one training run
(Clarke, Oldewage & Hernández-Lobato, ICLR 2022), and the baselines they compare with.

The weights train with SGD + momentum + weight decay (see :mod:`bilevel.recipes.onepass.algos` for the
update rule). Every *hyper-step* makes ``algorithm.weight_steps`` (T = 10) weight updates;
then, for the hypergradient algorithms, the learned raw hyperparameters
(``log10 lr``, ``log10 wd``, ``logit momentum``; ``lr`` per weight for HDLR) take one step of
Adam (κ = 0.05) along the hypergradient, and ``log10 lr`` is clipped to ``[-10, 0]``.
Training then continues from where it is (no reset), except for the *Long* Diff-through-Opt
variants (``algorithm.reset_model``), which restart from the initial weights each hyper-step.

A config is a data-set file plus an algorithm file::

    bilevel run onepass/uci_energy.yaml onepass/ours_wd_lr_m.yaml --out runs/ours
    bilevel sweep onepass/uci_energy.yaml -a onepass/random.yaml -a onepass/ours_wd_lr_m.yaml \\
        --inits 20 --parallel 2 --out runs/energy

``run.max_steps`` is the budget in *weight* steps (4000 for UCI); there are
``max_steps / weight_steps`` hyper-steps unless ``algorithm.hyper_steps`` fixes their number.
Logged every ``logging.every`` weight steps: ``{train,val,test}/loss`` (+ ``_unnormalised``,
``accuracy``/``error`` or ``perplexity``), ``hyper/*`` (quantiles for per-weight values),
``weight_steps``. Initial hyperparameters come from ``inner.*``; ``bilevel sweep`` draws them
from :data:`SEARCH_SPACE` (seeds.md §3.4).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from bilevel.errors import NonFiniteError
from bilevel.hypergrad import HyperSGD, write_grad
from bilevel.optim.hyperparameters import HParamSpec, Hyperparameters
from bilevel.recipes.onepass.algos import ALGORITHMS
from bilevel.recipes.onepass.inner import Inner
from bilevel.recipes.onepass.task import DataSection, ModelSection, Task, build_task
from bilevel.run import (
    Accessor,
    CheckpointConfig,
    LoggingConfig,
    RunConfig,
    RunDir,
    RunState,
    Section,
    resolve_device,
)
from bilevel.run.faults import kill_point
from bilevel.tree import tree_all_finite

# the building blocks benchmarks/onepass.py times, public here so nothing imports the private modules
__all__ = ["ALGORITHMS", "SEARCH_SPACE", "Config", "Inner", "Task", "build_task", "run"]

HName = Literal["lr", "weight_decay", "momentum"]
SEARCH_SPACE: dict[str, dict[str, Any]] = {  # Clarke et al.'s natural_sgd_generator
    "inner.lr": {"dist": "log10_uniform", "low": -6.0, "high": -1.0},
    "inner.weight_decay": {"dist": "log10_uniform", "low": -7.0, "high": -2.0},
    "inner.momentum": {"dist": "uniform", "low": 0.0, "high": 1.0},
    "algorithm.lr_multiplier": {"dist": "uniform", "low": 0.995, "high": 1.001},
}
_HYPERGRAD = ("lorraine", "baydin", "baydin_through_update", "ours", "diff_through_opt",
              "ours_initial_code")


class InnerSection(Section):
    """Initial values of the inner SGD's hyperparameters, and weight-gradient clipping."""

    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-5, gt=0.0)
    momentum: float = Field(0.5, gt=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="clip ∇L_T to this norm")


class AlgorithmSection(Section):
    """Which algorithm, what it learns and its schedule (seeds.md §3.2)."""

    name: Literal["random", "random_stepped_lr", "random_validation", "lorraine", "baydin",
                  "baydin_through_update", "ours", "diff_through_opt",
                  "ours_initial_code"] = "ours"
    learn: list[HName] = Field(default_factory=lambda: ["lr", "weight_decay", "momentum"])
    per_weight: list[HName] = Field(default_factory=list, description="HDLR: [lr]")
    weight_steps: int = Field(10, gt=0, description="T: weight steps per hyper-step")
    hyper_steps: int | None = Field(None, gt=0, description="None: run.max_steps / T")
    terms: int = Field(5, gt=0, description="Neumann terms i (ours, lorraine)")
    lookback: int = Field(5, gt=0, description="diff_through_opt: updates differentiated")
    reset_model: bool = Field(False, description="restart from the initial weights each hyper-step")
    outer: Literal["adam", "sgd"] = "adam"
    outer_lr: float = Field(0.05, gt=0.0)
    lr_multiplier: float = Field(1.0, gt=0.0, description="random_stepped_lr: lr *= m per hyper-step")
    train_on_val: bool = Field(False, description="train on train+validation (Random)")

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmSection:
        name, learns = self.name, bool(self.learn)
        if name in _HYPERGRAD and not learns:
            raise ValueError(f"algorithm {name!r} needs algorithm.learn (e.g. [lr, weight_decay])")
        if name not in _HYPERGRAD and learns:
            raise ValueError(f"algorithm {name!r} learns nothing: set algorithm.learn: []")
        if name.startswith("baydin") and (self.learn != ["lr"] or self.per_weight):
            raise ValueError(f"algorithm {name!r} learns one learning rate only: "
                             "algorithm.learn: [lr], algorithm.per_weight: []")
        if not set(self.per_weight) <= set(self.learn):
            raise ValueError(f"algorithm.per_weight {self.per_weight} must be a subset of "
                             f"algorithm.learn {self.learn}")
        if name == "ours_initial_code" and self.weight_steps < 2:
            raise ValueError("algorithm 'ours_initial_code' differentiates the last two updates: "
                             "algorithm.weight_steps must be at least 2")
        if name == "diff_through_opt" and self.lookback > self.weight_steps:
            raise ValueError(f"algorithm.lookback ({self.lookback}) must be at most "
                             f"algorithm.weight_steps ({self.weight_steps})")
        return self


class Config(Section):
    """onepass's config: data, model, initial hyperparameters, algorithm, run."""

    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    inner: InnerSection = InnerSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    run: RunConfig = RunConfig(max_steps=4000, nan_policy="skip")
    logging: LoggingConfig = LoggingConfig(every=10, tensorboard=False)
    checkpoint: CheckpointConfig = CheckpointConfig(every=100, keep_last=2)

    @model_validator(mode="after")
    def _schedule(self) -> Config:
        a = self.algorithm
        if a.hyper_steps is None and self.run.max_steps % a.weight_steps:
            raise ValueError(f"run.max_steps ({self.run.max_steps}) must be a multiple of "
                             f"algorithm.weight_steps ({a.weight_steps}), or set algorithm.hyper_steps")
        if self.run.nan_policy == "rollback":
            raise ValueError("onepass supports run.nan_policy 'skip' (no hyper-update on a "
                             "non-finite hypergradient) or 'abort', not 'rollback'")
        return self


def hyperparameters(config: Config, like: dict[str, torch.Tensor]) -> Hyperparameters:
    """Clarke et al.'s parametrisation: lr and wd in log10, momentum as a logit."""
    a, i = config.algorithm, config.inner
    def spec(name: str, init: float, transform: str, **clip: float) -> HParamSpec:
        return HParamSpec(init=init, transform=transform, learn=name in a.learn,
                          granularity="element" if name in a.per_weight else "scalar", **clip)
    return Hyperparameters({"lr": spec("lr", i.lr, "log10", low=-10.0, high=0.0),
                            "weight_decay": spec("weight_decay", i.weight_decay, "log10"),
                            "momentum": spec("momentum", i.momentum, "sigmoid")}, like=like)


def adopt_state(state: dict[str, Any], config: Config) -> dict[str, Any]:
    """The sweep hook for PBT: a donor's checkpoint takes the explored config's ``inner.*``
    values as its (learned) hyperparameters; weights, momentum buffers, the outer Adam state
    and the data order stay the donor's."""
    return {**state, "hp": hyperparameters(config, dict(state["w"])).state_dict()}


def drop_in(config: Config, w: dict[str, torch.Tensor]) -> HyperSGD:
    """Algorithm ``ours`` as users run it: :class:`HyperSGD` over the weight leaves ``w``,
    with Clarke et al.'s parametrisation and schedule (as :func:`hyperparameters`)."""
    a, i = config.algorithm, config.inner
    return HyperSGD(w.items(), lr=i.lr, weight_decay=i.weight_decay, momentum=i.momentum,
                    learn=a.learn, granularity=dict.fromkeys(a.per_weight, "element"),
                    method="one_pass", terms=a.terms, hyper_every=a.weight_steps,
                    hyper_optimizer=a.outer, hyper_lr=a.outer_lr, lr_bounds=(1e-10, 1.0),
                    grad_clip=i.grad_clip, on_divergence="identity", on_nonfinite="skip")


def outer_optimizer(hp: Hyperparameters, algorithm: AlgorithmSection) -> torch.optim.Optimizer | None:
    """Adam (or SGD) at ``algorithm.outer_lr`` over the learned raw hyperparameters, if any."""
    cls = torch.optim.Adam if algorithm.outer == "adam" else torch.optim.SGD
    return cls(hp.learned(), lr=algorithm.outer_lr) if hp.learned() else None


def hyper_update(hp: Hyperparameters, outer: torch.optim.Optimizer | None, hg: Any, *,
                 nan_policy: str, step: int) -> bool:
    """One outer step along the hypergradient ``hg``, then the ``log10 lr`` clip.

    Returns False when ``hg`` is non-finite and the step was skipped (``nan_policy: skip``);
    raises :class:`NonFiniteError` under ``abort``. Nothing to do (True) when nothing is learned.
    """
    if hg is None or outer is None:
        return True
    if not bool(tree_all_finite(hg)):
        if nan_policy == "abort":
            raise NonFiniteError(f"non-finite hypergradient at hyper-step {step} "
                                 "(set run.nan_policy: skip to skip such updates)",
                                 step=step, what="hypergradient")
        return False
    write_grad(hg, hp.raw_tree())
    outer.step()
    hp.clip_()
    return True


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train with the configured algorithm; return the final metrics of every split."""
    a = config.algorithm
    device = resolve_device(config.run.device)
    task = build_task(config.data, config.model, train_on_val=a.train_on_val,
                      seed=config.run.seed, device=device)
    w0 = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    zeros = {k: torch.zeros_like(v) for k, v in w0.items()}
    if a.name == "ours":  # the drop-in users get; it holds the hyperparameters and Adam
        leaves = {k: v.clone().requires_grad_() for k, v in w0.items()}
        opt = drop_in(config, leaves)
        hp, outer = opt.hp, opt.hyper_opt
        inner = Inner(task, hp, leaves, zeros, config.inner.grad_clip, opt=opt)
    else:
        hp = hyperparameters(config, w0).to(device)
        inner = Inner(task, hp, dict(w0), zeros, config.inner.grad_clip)
        outer = outer_optimizer(hp, a)
    hyper_step = ALGORITHMS[a.name]
    n_hyper = a.hyper_steps or config.run.max_steps // a.weight_steps
    counts = {"skipped": 0}

    # The algorithms rebind inner.w, inner.buf and inner.t (and inner.w starts as w0 itself,
    # kept for resets), so these are read and set through the Inner, never copied into.
    # opt goes first: set_weights then replaces the momentum buffers it loaded. An absent
    # optimiser saves {}, as checkpoints always have.
    state = RunState(
        opt=inner.opt or {},
        w=Accessor(get=lambda: {k: v.detach() for k, v in inner.w.items()},
                   set=lambda w: inner.set_weights(w, inner.buffers())),
        buf=Accessor(get=inner.buffers, set=lambda buf: inner.set_weights(inner.w, buf)),
        t=Accessor(get=lambda: inner.t, set=lambda t: setattr(inner, "t", int(t))),
        hp=hp, outer=outer or {}, task=task, **Accessor.items(counts))
    start = run_dir.resume(state, save_start=True)

    metrics: dict[str, float] = {}
    for step in run_dir.steps(start, n_hyper):
        if a.reset_model and step > 1:  # Long Diff-through-Opt: every hyper-step from w0
            inner.set_weights(w0, zeros)
        logged_before = inner.t // config.logging.every
        hg, outer_loss = hyper_step(inner, weight_steps=a.weight_steps, terms=a.terms,
                                    lookback=a.lookback)
        kill_point("hyper")
        if not bool(tree_all_finite(inner.w)):  # training itself diverged: a measured outcome
            run_dir.event(step, "diverged", weight_steps=inner.t)
            metrics = {**dict.fromkeys(metrics or task.evaluate(w0), math.nan),
                       "weight_steps": float(inner.t)}
            run_dir.log(step, metrics)
            run_dir.checkpoint(step, state, force=True)
            break
        if not hyper_update(hp, outer, hg, nan_policy=config.run.nan_policy, step=step):
            counts["skipped"] += 1
            run_dir.event(step, "nonfinite", what="hypergradient", action="skip")
        if a.name == "random_stepped_lr":
            hp.shift_("lr", math.log10(a.lr_multiplier))
        if inner.t // config.logging.every > logged_before or step == n_hyper:
            metrics = {**task.evaluate(inner.w), **{f"hyper/{k}": v for k, v in hp.summary().items()},
                       "weight_steps": float(inner.t)}
            if outer_loss is not None:
                metrics["hyper/outer_loss"] = float(outer_loss)
            run_dir.log(step, metrics)
        run_dir.checkpoint(step, state, force=step == n_hyper)
    if not metrics:  # resumed after the last step: nothing left to run
        metrics = {**task.evaluate(inner.w), "weight_steps": float(inner.t)}
    return {**metrics, "hypergrad_skipped": float(counts["skipped"])}
