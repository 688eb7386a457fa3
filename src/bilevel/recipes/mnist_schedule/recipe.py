"""mnist_schedule: learn a whole training run's learning-rate and momentum schedule, exactly.

The inner problem is a full SGD-with-momentum run of ``schedule.steps`` steps (T) of an MLP
on MNIST, with fixed minibatch order and initial weights. The schedule has one learning rate
and one momentum per ``schedule.every`` steps (``log10 lr`` and ``logit γ``). Each hyper-step
computes the exact hypergradient of the *final* validation loss through all T steps with
:func:`bilevel.hypergrad.reversible` (Maclaurin et al., 2015: memory flat in T) and moves the
schedule by Adam. It starts from a poor constant schedule (``schedule.lr``,
``schedule.momentum``).

At the end every arm trains once more from the same weights on the same minibatches and is
scored on the test set: the unlearned start, the learned schedule, each fixed learning rate
of ``baselines.grid`` (the best by validation loss is "best fixed"), and the hand-written step
schedule (``baselines.step_lr``, divided by ``baselines.step_factor`` at each fraction of
``baselines.step_at``). The learned schedule goes to ``schedule.json`` and ``schedule.png``.

Run it::

    bilevel data fetch mnist
    bilevel run mnist_schedule/mlp.yaml --out runs/mnist_schedule
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from bilevel import hypergrad
from bilevel.data import load_dataset
from bilevel.functional import call
from bilevel.models import MLP
from bilevel.recipes.mnist_schedule.plot import plot_schedule
from bilevel.run import (
    AbortRunConfig,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MLPConfig,
    RunDir,
    RunState,
    Section,
    resolve_device,
)

Schedule = Callable[[int], float]


class ScheduleConfig(Section):
    """The inner run and the learned schedule's shape and start."""

    steps: int = Field(3000, gt=0, description="SGD steps of the inner run (T)")
    every: int = Field(100, gt=0, description="steps per learned lr / momentum value")
    lr: float = Field(0.01, gt=0, description="constant learning rate the schedule starts from")
    momentum: float = Field(0.5, gt=0.1, lt=0.99, description="constant momentum it starts from")
    momentum_range: tuple[float, float] = Field((0.1, 0.99), description="momentum kept inside")
    lr_range: tuple[float, float] = Field((1e-4, 3.0), description="learning rate kept inside")
    bits: int = Field(44, ge=8, le=52, description="fixed-point fraction bits of reversible")


class OuterConfig(Section):
    """Adam on ``(log10 lr, logit momentum)``; ``run.max_steps`` hyper-steps."""

    lr: float = Field(0.1, gt=0)


class BaselineConfig(Section):
    """The arms the learned schedule is compared with (all at ``momentum``)."""

    grid: list[float] = Field([0.01, 0.03, 0.1, 0.3], min_length=1, description="fixed lrs")
    momentum: float = Field(0.9, ge=0, lt=1)
    step_lr: float = Field(0.1, gt=0)
    step_at: list[float] = Field([0.5, 0.75], description="fractions of T where lr drops")
    step_factor: float = Field(10.0, gt=1)


class Config(Section):
    """Data, MLP, schedule, outer Adam, baselines, validation subset."""

    data: DataConfig = DataConfig(name="mnist", batch_size=100)
    model: MLPConfig = MLPConfig(hidden=[50])
    schedule: ScheduleConfig = ScheduleConfig()
    outer: OuterConfig = OuterConfig()
    baselines: BaselineConfig = BaselineConfig()
    val_size: int = Field(5000, gt=0, description="validation rows of the outer loss")
    run: AbortRunConfig  # hypergrad.reversible raises on a non-finite value: exit 1
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=5)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Learn the schedule; return every arm's test accuracy and loss."""
    device = resolve_device(config.run.device)
    cs = config.schedule
    ds = load_dataset(config.data.name, data_dir=config.data.data_dir,
                      split_seed=config.data.split_seed).to(device)
    xt, yt = ds.train.x.flatten(1), ds.train.y
    xv, yv = ds.val.x.flatten(1)[:config.val_size], ds.val.y[:config.val_size]
    model = MLP([xt.shape[1], *config.model.hidden, ds.info["num_classes"]],
                config.model.activation).to(device)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = _batches(len(yt), config.data.batch_size, cs.steps, config.run.seed, device)

    # reversible runs its own exact SGD-momentum on the weights, so it takes the training
    # loss itself, ``loss_fn(w, h, t)``, not a kit step; the MLP has no buffers.
    def loss_fn(w: dict[str, torch.Tensor], h: Any, t: int) -> torch.Tensor:
        return F.cross_entropy(call(model, w, {}, xt[batches[t]])[0], yt[batches[t]])

    def val_loss(w: dict[str, torch.Tensor], h: Any) -> torch.Tensor:
        return F.cross_entropy(call(model, w, {}, xv)[0], yv)

    n = math.ceil(cs.steps / cs.every)
    h = {"log_lr": torch.full((n,), math.log10(cs.lr), device=device, requires_grad=True),
         "logit_momentum": torch.full((n,), _logit(cs.momentum), device=device, requires_grad=True)}
    outer = torch.optim.Adam(h.values(), lr=config.outer.lr)
    bounds = {"log_lr": tuple(math.log10(x) for x in cs.lr_range),
              "logit_momentum": tuple(_logit(x) for x in cs.momentum_range)}

    def lr(hp: Any, t: int) -> torch.Tensor:
        return 10 ** hp["log_lr"][t // cs.every]

    def momentum(hp: Any, t: int) -> torch.Tensor:
        return torch.sigmoid(hp["logit_momentum"][t // cs.every])

    state = RunState(h=h, outer=outer)
    start = run_dir.resume(state)

    for step in run_dir.steps(start, config.run.max_steps):
        r = hypergrad.reversible(loss_fn, val_loss, w0, h, steps=cs.steps, lr=lr,
                                 momentum=momentum, bits=cs.bits)
        hypergrad.write_grad(r, h)
        outer.step()
        with torch.no_grad():
            for k, v in h.items():
                v.clamp_(*bounds[k])
        if step % config.logging.every == 0 or step == config.run.max_steps:
            run_dir.log(step, {
                "val/loss": r.outer_loss.item(),  # of the schedule before this update
                "hyper/lr_mean": (10 ** h["log_lr"].detach()).mean().item(),
                "hyper/momentum_mean": torch.sigmoid(h["logit_momentum"].detach()).mean().item(),
                "hyper/grad_norm": math.sqrt(sum(float(g.pow(2).sum()) for g in r.hypergrad.values())),
                "buffer_mb": r.info["buffer_bytes"] / 2**20,
            })
        run_dir.checkpoint(step, state, force=step == config.run.max_steps)

    learned_lr = (10 ** h["log_lr"].detach()).tolist()
    learned_mom = torch.sigmoid(h["logit_momentum"].detach()).tolist()
    b = config.baselines
    arms: dict[str, tuple[Schedule, Schedule]] = {
        "start": (lambda t: cs.lr, lambda t: cs.momentum),
        "learned": (lambda t: learned_lr[t // cs.every], lambda t: learned_mom[t // cs.every]),
        "step": (lambda t: b.step_lr / b.step_factor ** sum(t >= f * cs.steps for f in b.step_at),
                 lambda t: b.momentum),
    }
    for x in b.grid:
        arms[f"fixed_{x:g}"] = (lambda t, x=x: x, lambda t: b.momentum)
    scores = {name: _evaluate(loss_fn, model, w0, cs.steps, *sched, (xv, yv), (ds.test.x.flatten(1), ds.test.y))
              for name, sched in arms.items()}
    best = min((f"fixed_{x:g}" for x in b.grid), key=lambda k: scores[k]["val/loss"])
    summary = {f"{m}/{name}": v for name, s in scores.items() for m, v in s.items()}
    summary |= {f"{m}/best_fixed": v for m, v in scores[best].items()}
    summary["best_fixed_lr"] = float(best.removeprefix("fixed_"))
    _write_schedule(run_dir, cs, learned_lr, learned_mom, arms, best)
    return summary


def _batches(n: int, batch: int, steps: int, seed: int, device: torch.device) -> torch.Tensor:
    """Minibatch indices of every step ``[T, batch]``: epochs of a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    epochs = math.ceil(steps / per_epoch)
    idx = torch.cat([torch.randperm(n, generator=g)[:per_epoch * batch] for _ in range(epochs)])
    return idx.view(-1, batch)[:steps].to(device)


def _evaluate(loss_fn: Callable[..., torch.Tensor], model: torch.nn.Module, w0: dict[str, torch.Tensor],
              steps: int, lr: Schedule, momentum: Schedule,
              val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]
              ) -> dict[str, float]:
    """Train from ``w0`` with SGD + momentum (torch's convention) in float; score it."""
    w = {k: v.clone().requires_grad_() for k, v in w0.items()}
    opt = torch.optim.SGD(w.values(), lr=lr(0), momentum=momentum(0))
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr(t), momentum(t)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(w, None, t)
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
    out = {}
    with torch.no_grad():
        for split, (x, y) in (("val", val), ("test", test)):
            logits = call(model, w, {}, x)[0]
            loss = F.cross_entropy(logits, y).item()
            out[f"{split}/loss"] = loss if math.isfinite(loss) else float("inf")
            out[f"{split}/acc"] = (logits.argmax(1) == y).float().mean().item()
    return out


def _write_schedule(run_dir: RunDir, cs: ScheduleConfig, lr: list[float], mom: list[float],
                    arms: dict[str, tuple[Schedule, Schedule]], best: str) -> None:
    steps = list(range(0, cs.steps, cs.every))
    data = {"steps": steps, "every": cs.every, "learned": {"lr": lr, "momentum": mom},
            **{name: {"lr": [arms[name][0](t) for t in steps], "momentum": [arms[name][1](t) for t in steps]}
               for name in ("start", "step", best)}, "best_fixed": best}
    (run_dir.path / "schedule.json").write_text(json.dumps(data, indent=1))
    with contextlib.suppress(ImportError):  # matplotlib is the `plot` extra; JSON suffices
        plot_schedule(run_dir.path / "schedule.json", run_dir.path / "schedule.png")
