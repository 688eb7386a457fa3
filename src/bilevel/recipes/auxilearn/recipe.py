"""auxilearn: learn how to combine auxiliary losses (Navon et al., ICLR 2021) on few labels.

Main task: image classification (MNIST, Fashion-MNIST or digits) from
``tasks.labels_per_class`` labelled images per class. Auxiliary tasks of mixed usefulness
(:mod:`bilevel.recipes.auxilearn.tasks`): ``parity`` and ``gt4`` (coarse versions of the
label), ``rotation`` and ``flip`` (self-supervised: which transform was applied; on an
unlabelled pool when ``tasks.unlabelled > 0``, where they carry signal the labels do not),
and ``noise`` (a fixed random label per image, deliberately harmful).

A shared trunk (MLP) has one head per task; ``losses[b, j]`` is the per-example loss matrix
``[B, T]`` (column 0 is the main task). ``method`` picks the training loss:
``stl`` (main only), ``equal`` (sum of all columns), ``fixed`` (main + ``tasks.weights``
· auxiliary columns), or a learned combiner ``linear``
(monotone, weights start at 1 = equal weighting) or ``nonlinear`` (monotone MLP with a skip
connection on the main loss). For the learned ones, ``meta.aux_per_class`` images per class are
held out of the labelled pool as the *auxiliary set* (the primary net never trains on them;
the baselines train on the whole pool, so every method sees the same labels, unless
``tasks.baselines_hold_out`` holds it out of theirs too). Every
``meta.every`` steps, following AuxiLearn's protocol::

    L_A = main-task loss on one batch of the auxiliary set
    L_T = combiner(losses) on one training batch
    MetaOptimizer.step(train_loss=L_T, val_loss=L_A, parameters=w, aux_params=φ); clamp()

Validation accuracy (a fixed subset of the validation split) picks the reported test accuracy.

Run it::

    bilevel data fetch mnist
    bilevel run auxilearn/mnist_linear.yaml --out runs/auxilearn-linear
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from bilevel.data import IndexSampler
from bilevel.hypergrad import MetaOptimizer
from bilevel.meta.auxiliary import LinearCombiner, NonlinearCombiner, task_weights
from bilevel.recipes.auxilearn.tasks import (
    SIDE,
    TASKS,
    MultiTaskNet,
    NetSection,
    accuracy,
    per_task_losses,
    splits,
)
from bilevel.run import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    RunDir,
    RunState,
    Section,
    SGDConfig,
    SkipOrAbortRunConfig,
    resolve_device,
)
from bilevel.run.nan import on_nonfinite
from bilevel.run.schema import Width


class TasksConfig(Section):
    """The labelled pool and the auxiliary tasks (the main task is always digit class)."""

    labels_per_class: int = Field(10, gt=1, description="labelled training images per class")
    auxiliary: list[Literal["parity", "gt4", "rotation", "flip", "noise"]] = Field(
        default_factory=lambda: ["parity", "gt4", "rotation", "noise"])
    val_size: int = Field(1000, gt=0, description="validation images used for model selection")
    unlabelled: int = Field(0, ge=0, description=(
        "unlabelled training images for the self-supervised tasks (rotation, flip); "
        "0: they use the labelled images"))
    weights: list[float] | None = Field(None, description=(
        "method fixed: the weight of each auxiliary task, in the order of `auxiliary` "
        "(the main task's weight is 1)"))
    baselines_hold_out: bool = Field(False, description=(
        "hold the auxiliary set out of stl/equal/fixed too, so that every method trains the "
        "primary net on exactly the same labels"))


class MetaConfig(Section):
    """AuxiLearn's meta-step: MetaOptimizer settings and the meta-optimiser (SGD)."""

    combiner_hidden: list[Width] = Field([10], description="hidden widths (nonlinear only)")
    combiner_init: tuple[float, float] = Field(
        (0.0, 1.0), description="uniform init range of the nonlinear combiner's weights")
    aux_per_class: int = Field(1, gt=0, description="labelled images per class held out")
    every: int = Field(5, gt=0, description="meta-step every N primary steps")
    batch_size: int = Field(32, gt=0, description="training batch of the meta-step")
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    hpo_lr: float = Field(0.05, gt=0.0, description="Neumann step α (AuxiLearn: primary lr)")
    truncate_iter: int = Field(3, ge=0)
    max_grad_norm: float | None = Field(10.0, gt=0.0)
    on_divergence: Literal["raise", "identity"] = "identity"


class Config(Section):
    """auxilearn's config."""

    method: Literal["stl", "equal", "fixed", "linear", "nonlinear"] = "linear"
    data: DataConfig = DataConfig(name="mnist", batch_size=32)
    tasks: TasksConfig = TasksConfig()
    model: NetSection = NetSection(hidden=[256, 128])
    inner: SGDConfig = SGDConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)  # the authors'
    meta: MetaConfig = MetaConfig()
    eval_every: int = Field(100, gt=0, description="evaluate val/test accuracy every N steps")
    run: SkipOrAbortRunConfig
    logging: LoggingConfig = LoggingConfig(every=50)
    checkpoint: CheckpointConfig = CheckpointConfig(every=500)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.data.name not in SIDE:
            raise ValueError(f"data.name must be one of {sorted(SIDE)}, got {self.data.name!r}")
        w = self.tasks.weights
        if (self.method == "fixed") != (w is not None):
            raise ValueError("tasks.weights is required by method 'fixed' and read by no other "
                             "method: set both or neither")
        if w is not None and (len(w) != len(self.tasks.auxiliary) or min(w, default=0) < 0):
            raise ValueError(f"tasks.weights: one non-negative weight per auxiliary task "
                             f"{self.tasks.auxiliary}, got {w}")
        if self.tasks.unlabelled and not set(self.tasks.auxiliary) & {"rotation", "flip"}:
            raise ValueError("tasks.unlabelled feeds only the self-supervised tasks: add "
                             "rotation or flip to tasks.auxiliary, or set tasks.unlabelled: 0")
        if (self.method in ("linear", "nonlinear") or self.tasks.baselines_hold_out) and (
                self.meta.aux_per_class >= self.tasks.labels_per_class):
            raise ValueError(
                f"meta.aux_per_class ({self.meta.aux_per_class}) must be below "
                f"tasks.labels_per_class ({self.tasks.labels_per_class}): the auxiliary set is "
                "held out of the labelled pool and the primary net needs images to train on")
        return self


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train the multi-task net with ``config.method``; return test accuracy at best val."""
    device = resolve_device(config.run.device)
    data = splits(config, device)
    tasks = list(config.tasks.auxiliary)
    x_tr, y_tr, noise_tr = data["train"]
    model = MultiTaskNet(x_tr[0].numel(), config.model.hidden,
                         {"main": 10, **{t: TASKS[t] for t in tasks}}).to(device)
    inner = config.inner
    opt = torch.optim.SGD(model.parameters(), lr=inner.lr, weight_decay=inner.weight_decay,
                          momentum=inner.momentum)
    sampler = IndexSampler(len(y_tr), config.data.batch_size, seed=config.run.seed)
    samplers = {"sampler": sampler}  # every sampler, by its checkpoint key
    x_un = data.get("unlabelled")
    if x_un is not None:
        samplers["unlabelled"] = IndexSampler(len(x_un), config.data.batch_size,
                                              seed=config.run.seed + 3)
    n_tasks = 1 + len(tasks)
    combiner: nn.Module | None = None
    if config.method == "linear":
        combiner = LinearCombiner(n_tasks, monotone=True, init_value=1.0)
    elif config.method == "nonlinear":
        combiner = NonlinearCombiner(n_tasks, hidden_sizes=config.meta.combiner_hidden,
                                     init_range=config.meta.combiner_init, monotone=True)
    meta_opt, aux_sampler = None, None
    if combiner is not None:
        combiner.to(device)
        m = config.meta
        meta_opt = MetaOptimizer(
            torch.optim.SGD(combiner.parameters(), lr=m.lr, momentum=m.momentum,
                            weight_decay=m.weight_decay),
            hpo_lr=m.hpo_lr, truncate_iter=m.truncate_iter, max_grad_norm=m.max_grad_norm,
            on_divergence=m.on_divergence)
        aux_sampler = IndexSampler(len(data["aux"][1]), min(m.batch_size, len(data["aux"][1])),
                                   seed=config.run.seed + 1)
        meta_sampler = IndexSampler(len(y_tr), m.batch_size, seed=config.run.seed + 2)
        samplers |= {"aux_sampler": aux_sampler, "meta_sampler": meta_sampler}
        if x_un is not None:
            samplers["meta_unlabelled"] = IndexSampler(len(x_un), m.batch_size,
                                                       seed=config.run.seed + 4)
    fixed = torch.tensor([1.0, *(config.tasks.weights or [])], device=device)
    best = {"val/acc": -1.0, "test/acc_at_best_val": 0.0, "best_step": 0.0}

    def train_loss(idx: torch.Tensor, step: int, u_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        u_idx = next(samplers[u_key]) if x_un is not None else None
        ell = per_task_losses(model, x_tr[idx], y_tr[idx], noise_tr[idx], idx, step, tasks,
                              None if u_idx is None else x_un[u_idx], u_idx)
        if config.method == "stl":
            return ell[:, 0].mean(), ell
        if config.method == "equal":
            return ell.sum(1).mean(), ell
        if config.method == "fixed":
            return (ell * fixed).sum(1).mean(), ell
        assert combiner is not None
        return combiner(ell), ell

    state = RunState(model=model, opt=opt, best=best, **samplers, combiner=combiner,
                     meta_opt=meta_opt)  # the last two: None for stl/equal/fixed
    start = run_dir.resume(state)

    for step in run_dir.steps(start, config.run.max_steps):
        model.train()
        loss, ell = train_loss(next(sampler), step, "unlabelled")
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
        else:  # skip (or abort): a non-finite loss would poison the weights
            on_nonfinite(run_dir, config.run.nan_policy, step=step, what="training loss")
        record: dict[str, float] = {}
        if meta_opt is not None and combiner is not None and aux_sampler is not None \
                and step % config.meta.every == 0:
            x_a, y_a = data["aux"]
            a_idx = next(aux_sampler)
            val_loss = F.cross_entropy(model(x_a[a_idx], "main"), y_a[a_idx])
            meta_loss, ell = train_loss(next(meta_sampler), step, "meta_unlabelled")
            if torch.isfinite(val_loss) and torch.isfinite(meta_loss):
                meta_opt.step(train_loss=meta_loss, val_loss=val_loss,
                              parameters=list(model.parameters()),
                              aux_params=combiner.parameters())
                combiner.clamp()
                record |= {"meta/aux_loss": float(val_loss.detach()), "meta/grad_norm":
                           meta_opt.last_info["grad_norm"]}
            else:
                on_nonfinite(run_dir, config.run.nan_policy, step=step, what="meta-step loss")
        if step % config.eval_every == 0 or step == config.run.max_steps:
            val_acc, test_acc = accuracy(model, *data["val"]), accuracy(model, *data["test"])
            record |= {"val/acc": val_acc, "test/acc": test_acc}
            if val_acc > best["val/acc"]:
                best.update({"val/acc": val_acc, "test/acc_at_best_val": test_acc,
                             "best_step": float(step)})
        if step % config.logging.every == 0 or step == config.run.max_steps:
            record["train/loss"] = float(loss.detach())
            weights = (task_weights(combiner, ell) if combiner is not None else
                       fixed if config.method == "fixed" else
                       torch.tensor([1.0] + [float(config.method == "equal")] * len(tasks)))
            record |= {f"weight/{name}": float(w) for name, w in
                       zip(["main", *tasks], weights, strict=True)}
        if record:
            run_dir.log(step, record)
        run_dir.checkpoint(step, state, force=step == config.run.max_steps)

    final = {"test/acc": accuracy(model, *data["test"]), "val/acc_final": accuracy(model, *data["val"])}
    return {**final, **best}
