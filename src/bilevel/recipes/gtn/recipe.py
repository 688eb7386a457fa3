r"""gtn: Generative Teaching Networks, synthetic data and a learned curriculum for MNIST.

Every outer step trains a *freshly initialised* learner (``bilevel.models.GTNLearner``) for
``hypergrad.steps`` = T SGD-with-momentum steps on synthetic batches from the teacher
(:class:`bilevel.recipes.gtn.teacher.Teacher`), then scores it on a batch of real training images:

.. math::

    x_t = G_\theta(Z_t, y), \quad
    b_{t+1} = \mu b_t + \nabla_w \ell(f_{w_t}(x_t), y), \quad w_{t+1} = w_t - \eta b_{t+1},
    \qquad L_{\text{meta}} = \mathrm{NLL}(f_{w_T}(x_{\text{real}}), y_{\text{real}})

and Adam descends the exact unrolled hypergradient :math:`dL_{\text{meta}}/d(\theta, Z, \eta,
\mu)` (``bilevel.hypergrad.unrolled``; ``hypergrad.method: checkpointed`` recomputes segments
in the backward pass to save memory). ``teacher.curriculum`` picks ``learned`` / ``random_fixed``
/ ``random`` inputs ``Z``. The inner loss is the seed's ``KLDiv(log_softmax, onehot)`` with
mean reduction (= cross-entropy / classes; ``learner.loss: cross_entropy`` drops the /10).

Conventions (as ``GoodAI/GTN`` unless noted): labels ``b mod 10`` along the batch, the same at
every step; BatchNorm in train mode (batch statistics) in the inner loop and the meta-loss;
the learner's initial weights are a function of ``(run.seed, outer step)`` only. Unlike the seed,
test accuracy is measured outside the graph, under ``no_grad``, every ``eval.every`` outer
steps, with ``eval.batchnorm: batch`` (statistics of each 1000-image test chunk, the seed's
train-mode protocol) or ``running`` (the learner's running statistics after T steps).

Run it::

    bilevel run gtn/mnist_c_learned.yaml --out runs/gtn/c_learned
    bilevel gtn shuffle-test runs/gtn/c_learned --learners 100
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from bilevel import hypergrad
from bilevel.data import IndexSampler
from bilevel.data.image_splits import image_splits
from bilevel.functional import call, module_state
from bilevel.optim import sgd
from bilevel.recipes.gtn.models import GTNLearner, GTNTeacher
from bilevel.recipes.gtn.plots import image_grid
from bilevel.recipes.gtn.teacher import Curriculum, LrParam, Teacher
from bilevel.run import (
    Backprop,
    CheckpointConfig,
    LoggingConfig,
    OuterOptimConfig,
    RunDir,
    RunState,
    Section,
    SkipOrAbortRunConfig,
    Unrolled,
    all_finite,
    on_nonfinite,
    resolve_device,
)


class DataSection(Section):
    """Real images: the meta-loss batch comes from ``train``, test accuracy from ``test``."""

    name: Literal["mnist", "digits"] = "mnist"
    data_dir: str | None = None
    split_seed: int = Field(0, ge=0)
    image_size: int = Field(28, ge=12, description="images are resized to this side if needed")
    scale: Literal["standard", "symmetric"] = Field(
        "standard", description="standard: (x - mean) / std; symmetric: 2x - 1 in [-1, 1]")
    meta_batch: int = Field(1024, gt=0, description="real training images in the meta-loss")


class TeacherSection(Section):
    """The generator and its curriculum inputs."""

    curriculum: Curriculum = "learned"
    batch_size: int = Field(16, gt=0, description="synthetic images per inner step")
    architecture: Literal["cpu", "original"] = Field(
        "cpu", description="cpu: 64x7x7 map upsampled (3.3 M weights); original: seed's 103 M")
    noise_dim: int = Field(64, gt=0)
    fc1_size: int = Field(1024, gt=0)
    map_filters: int = Field(64, gt=0)
    map_size: int = Field(7, gt=0)
    conv1_filters: int = Field(64, gt=0)
    lr_param: LrParam = Field(
        "capped", description="learner lr/momentum: capped (raw values clamped into lr_range / "
        "momentum_range; the default, the stable one over 1500 outer steps: docs/results.md), "
        "raw (GoodAI's), or softplus/sigmoid of raw values")
    lr_range: tuple[float, float] = Field((1e-4, 1.0), description="capped: lr bounds")
    momentum_range: tuple[float, float] = Field((0.0, 0.99), description="capped: momentum bounds")


class LearnerSection(Section):
    """The learner CNN and its inner loss."""

    conv1_filters: int = Field(64, gt=0)
    conv2_filters: int = Field(128, gt=0)
    loss: Literal["kl_div", "cross_entropy"] = "kl_div"


class EvalSection(Section):
    """Test-set evaluation (no grad, outside the graph) and image grids."""

    every: int = Field(50, gt=0, description="evaluate every N outer steps (and at the end)")
    test_size: int | None = Field(None, gt=0, description="first N test images (None: all)")
    batchnorm: Literal["batch", "running"] = "batch"
    images_every: int = Field(0, ge=0, description="image grid every N steps (0: end only)")


class InnerSection(Section):
    """The learner's SGD with momentum: the start of the learned lr and momentum (the seed's
    0.02 and 0.5); no weight decay, as in GoodAI/GTN."""

    name: Literal["momentum"] = "momentum"
    lr: float = Field(0.02, gt=0.0)
    momentum: float = Field(0.5, gt=0.0, lt=1.0)


class Config(Section):
    """gtn's config. ``hypergrad.steps`` is the inner loop length T."""

    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    learner: LearnerSection = LearnerSection()
    inner: InnerSection = InnerSection()
    hypergrad: Backprop = Unrolled(steps=10)
    outer: OuterOptimConfig = OuterOptimConfig(name="adam", lr=1e-2)
    eval: EvalSection = EvalSection()
    run: SkipOrAbortRunConfig  # each outer step restarts the learner: skip or abort
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = []
        size = 28 if self.teacher.architecture == "original" else self.data.image_size
        map_size = 28 if self.teacher.architecture == "original" else self.teacher.map_size
        if self.data.image_size % map_size or size != self.data.image_size:
            problems.append(f"teacher.map_size ({map_size}) must divide data.image_size "
                            f"({self.data.image_size}); the original teacher needs image_size 28")
        if self.teacher.lr_param == "capped":
            (lo, hi), (mlo, mhi) = self.teacher.lr_range, self.teacher.momentum_range
            if not (0 <= lo < hi and 0 <= mlo < mhi <= 1 and lo <= self.inner.lr <= hi
                    and mlo <= self.inner.momentum <= mhi):
                problems.append(f"teacher.lr_range {self.teacher.lr_range} / momentum_range "
                                f"{self.teacher.momentum_range}: need 0 <= low < high (momentum "
                                f"high <= 1) containing inner.lr {self.inner.lr} and "
                                f"inner.momentum {self.inner.momentum}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------- building blocks


def load_images(cfg: DataSection, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train": (x, y), "test": (x, y)}`` at ``cfg.image_size``, scaled as configured."""
    return image_splits(cfg.name, data_dir=cfg.data_dir, split_seed=cfg.split_seed,
                        splits=("train", "test"), side=cfg.image_size, scale=cfg.scale,
                        device=device)[0]


def build_teacher(config: Config, *, seed: int) -> Teacher:
    tc = config.teacher
    if tc.architecture == "original":
        gen = GTNTeacher.original(tc.noise_dim)
    else:
        gen = GTNTeacher(tc.noise_dim, fc1_size=tc.fc1_size, map_filters=tc.map_filters,
                         map_size=tc.map_size, conv1_filters=tc.conv1_filters,
                         out_size=config.data.image_size)
    return Teacher(gen, curriculum=tc.curriculum, steps=config.hypergrad.steps,
                   batch_size=tc.batch_size, noise_dim=tc.noise_dim, lr=config.inner.lr,
                   momentum=config.inner.momentum, seed=seed, lr_param=tc.lr_param,
                   lr_range=tc.lr_range, momentum_range=tc.momentum_range)


def build_learner(config: Config) -> GTNLearner:
    return GTNLearner(conv1_filters=config.learner.conv1_filters,
                      conv2_filters=config.learner.conv2_filters,
                      image_size=config.data.image_size)


def fresh_learner(learner: GTNLearner, *, seed: int) -> dict[str, Any]:
    """A new learner's inner state ``{params, buffers, opt}``, a function of ``seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in learner.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    params, buffers = module_state(learner)
    return {"params": params, "buffers": buffers, "opt": sgd.init(params)}


def learner_seed(run_seed: int, outer_step: int) -> int:
    return (run_seed * 1_000_003 + outer_step) % (2**63)


def make_problem(learner: GTNLearner, teacher: Teacher, config: Config, drawn: Tensor | None,
                 order: list[int] | None = None, *, meta: tuple[Tensor, Tensor] | None = None
                 ) -> hypergrad.Problem:
    """The inner loop from the module kit: SGD with the teacher's learned lr and momentum on
    the synthetic batch ``t``, and the meta-loss: NLL of the trained learner on the real batch
    ``meta = (x, y)`` with batch statistics, as in the seed.

    ``step`` is the pure map ``state_{t+1} = step(state_t, hp, t)``; ``order[t]`` is the
    curriculum step shown at inner step ``t`` (the shuffle test), ``None`` the learned order.
    Without ``meta`` only ``step`` may be used.
    """
    kl = config.learner.loss == "kl_div"

    def train_loss(model: GTNLearner, hp: dict[str, Tensor], t: int) -> Tensor:
        x, y = teacher.batch(hp, t if order is None else order[t], drawn)  # [B, 1, H, W], [B]
        model.train()
        out = model(x)  # log-probs [B, 10]
        loss = F.nll_loss(out, y)
        # the seed's KLDiv(log-probs, onehot), mean over B*C elements, is CE / C
        return loss / out.shape[1] if kl else loss

    def meta_loss(model: GTNLearner, hp: dict[str, Tensor]) -> Tensor:
        if meta is None:
            raise ValueError("make_problem(..., meta=(x, y)) is needed for the meta-loss")
        model.train()  # batch statistics of the real batch, as in the seed
        return F.nll_loss(model(meta[0]), meta[1])  # [M, 10] log-probs

    return hypergrad.problem(learner, train_loss, meta_loss, hparams=teacher.hparams(), rule=sgd,
                             lr=teacher.learner_lr, momentum=teacher.learner_momentum)


@torch.no_grad()
def test_accuracy(learner: GTNLearner, state: dict[str, Any], x: Tensor, y: Tensor, *,
                  batchnorm: str, chunk: int = 1000) -> float:
    """Accuracy of the learner ``state`` on ``(x, y)``, outside any graph."""
    learner.train(batchnorm == "batch")
    params = {k: v.detach() for k, v in state["params"].items()}
    correct = 0
    for i in range(0, len(x), chunk):
        out, _ = call(learner, params, state["buffers"], x[i: i + chunk])
        correct += int((out.argmax(1) == y[i: i + chunk]).sum())
    learner.train()
    return correct / len(x)


def train_learner(learner: GTNLearner, teacher: Teacher, config: Config, *, seed: int,
                  drawn: Tensor | None, order: list[int] | None = None) -> dict[str, Any]:
    """Train a fresh learner on the curriculum (no hypergradient) and return its state."""
    hp = {k: v.detach() for k, v in teacher.hparams().items()}
    step = make_problem(learner, teacher, config, drawn, order).step
    state = fresh_learner(learner, seed=seed)
    for t in range(config.hypergrad.steps):
        state["params"] = {k: v.detach().requires_grad_() for k, v in state["params"].items()}
        with torch.enable_grad():
            new = step(state, hp, t)
        state = {"params": {k: v.detach() for k, v in new["params"].items()},
                 "buffers": new["buffers"], "opt": new["opt"]._replace(
                     momentum_buffer={k: v.detach() for k, v in new["opt"].momentum_buffer.items()})}
    return state


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the recipe


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train the teacher; return final test accuracy, learned lr/momentum, meta-loss."""
    device = resolve_device(config.run.device)
    data = load_images(config.data, device)
    x_test, y_test = data["test"]
    if config.eval.test_size is not None:
        x_test, y_test = x_test[: config.eval.test_size], y_test[: config.eval.test_size]
    teacher = build_teacher(config, seed=config.run.seed).to(device)
    learner = build_learner(config).to(device)
    hp = teacher.hparams()
    opt = config.outer.make(hp.values())
    meta_sampler = IndexSampler(len(data["train"][0]), config.data.meta_batch,
                                seed=config.run.seed, device=device)
    noise_rng = torch.Generator(device=device).manual_seed(config.run.seed + 1)

    state = RunState(teacher=teacher, outer_opt=opt, meta_sampler=meta_sampler,
                     noise_rng=noise_rng)
    start = run_dir.resume(state, save_start=True)

    result: dict[str, float] = {}
    for step in run_dir.steps(start, config.run.max_steps):
        t0 = time.perf_counter()
        idx = next(meta_sampler)
        x_meta, y_meta = data["train"][0][idx], data["train"][1][idx]  # [M, 1, H, W], [M]
        drawn = teacher.sample_noise(generator=noise_rng)  # [T, B, d] for 'random', else None
        state0 = fresh_learner(learner, seed=learner_seed(config.run.seed, step))
        p = make_problem(learner, teacher, config, drawn, meta=(x_meta, y_meta))
        r = hypergrad.from_config(config.hypergrad)(p.step, p.outer_loss, state0, hp,
                                                    check_finite=False)
        grads = [r.hypergrad[k] for k in hp]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if all_finite(grads) and bool(torch.isfinite(r.outer_loss)):
            hypergrad.write_grad(r, hp, max_norm=config.outer.grad_clip)
            opt.step()
        else:  # skip: the teacher does not move; abort raises
            on_nonfinite(run_dir, config.run.nan_policy, step=step, what="hypergradient")
        seconds = time.perf_counter() - t0

        last = step == config.run.max_steps
        values: dict[str, float] = {}
        if step % config.logging.every == 0 or last:
            meta_acc = test_accuracy(learner, r.state, x_meta, y_meta, batchnorm="batch")
            values.update({"meta/loss": float(r.outer_loss), "meta/acc": meta_acc,
                           "hyper/lr": float(teacher.learner_lr(hp).detach()),
                           "hyper/momentum": float(teacher.learner_momentum(hp).detach()),
                           "hypergrad/norm": float(gnorm), "time/outer_s": seconds,
                           "sys/rss_mb": rss_mb(), "sys/peak_rss_mb": peak_rss_mb()})
        if step % config.eval.every == 0 or last:
            values["test/acc"] = test_accuracy(learner, r.state, x_test, y_test,
                                               batchnorm=config.eval.batchnorm)
        if values:
            run_dir.log(step, values)
            result.update(values)
        every_img = config.eval.images_every
        if last or (every_img and step % every_img == 0):
            save_grid(teacher, run_dir.path / "images" / f"step-{step:06d}.png", drawn,
                      title=f"{config.teacher.curriculum}, outer step {step}")
        run_dir.checkpoint(step, state, force=last)

    keep = ("test/acc", "meta/loss", "meta/acc", "hyper/lr", "hyper/momentum")
    return {k: result[k] for k in keep if k in result}


@torch.no_grad()
def save_grid(teacher: Teacher, path: Any, drawn: Tensor | None, *, title: str) -> None:
    """Write the curriculum's images (rows = inner steps, columns = batch) as a PNG."""
    hp = {k: v.detach() for k, v in teacher.hparams().items()}
    images = torch.stack([teacher.batch(hp, t, drawn)[0] for t in range(teacher.steps)])
    image_grid(images, path, labels=teacher.labels.tolist(), title=title)
