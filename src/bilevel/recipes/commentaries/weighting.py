"""commentaries_weighting: learn an example-weighting teacher by backprop through training.

Commentaries Alg. 1 (Raghu et al., ICLR 2021; seeds.md §1.1). Every outer step re-trains a
CBR student from the *same* initialisation θ0 for ``hypergrad.steps`` inner Adam steps on
batches of ``data.batch_size`` training images, minimising ``Σ_b c_b·NLL_b`` with
``c = teacher(x, i / steps)``; the meta-loss is the unweighted validation NLL (summed per
batch, averaged over batches, student BN in train mode); its exact derivative w.r.t. the
teacher's weights φ comes from :func:`bilevel.hypergrad.unrolled` and φ takes one Adam step.

Run it::

    bilevel run commentaries_weighting/mnist_curr.yaml --out runs/commentaries/teacher

Outputs beside the usual run files: ``teacher.pt`` (φ and the teacher's config, read by
``bilevel commentaries student``), ``curriculum.npz`` (teacher weights of probe images over
the progress grid, their labels and hardness, and the weights of the last unroll) for
``bilevel commentaries plot``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from bilevel import hypergrad
from bilevel.data.image_splits import Splits, image_splits
from bilevel.functional import call, module_state
from bilevel.meta import weighting
from bilevel.models import CBRStudent, CBRTeacher
from bilevel.optim import adam
from bilevel.run import (
    Backprop,
    CheckpointConfig,
    InnerOptimConfig,
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


class ImageDataConfig(Section):
    """Images for the CBR networks; ``*_size`` subsample a split (``None``: all of it)."""

    name: Literal["mnist", "fashion_mnist", "digits"] = "mnist"
    data_dir: str | None = None
    split_seed: int = Field(0, ge=0, description="seed of the train/val split (the seed's)")
    batch_size: int = Field(8, gt=0)
    train_size: int | None = Field(None, gt=0)
    val_size: int | None = Field(1000, gt=0, description="meta-loss images (seed: all 10k)")
    test_size: int | None = Field(2000, gt=0)


class TeacherConfig(Section):
    """``curr``: teacher with the iteration channel; ``nocurr``: without."""

    arch: Literal["curr", "nocurr"] = "curr"


class CurriculumConfig(Section):
    """What ``curriculum.npz`` records: ``probe_size`` val images at ``points`` progress values."""

    probe_size: int = Field(500, gt=0)
    points: int = Field(20, gt=1)


class Config(Section):
    """Alg. 1's config (defaults: the seed's, with the val set subsampled for CPU)."""

    data: ImageDataConfig = ImageDataConfig()
    teacher: TeacherConfig = TeacherConfig()
    inner: InnerOptimConfig = InnerOptimConfig(name="adam", lr=1e-4)
    outer: OuterOptimConfig = OuterOptimConfig(name="adam", lr=1e-4)
    hypergrad: Backprop = Unrolled(steps=100)
    curriculum: CurriculumConfig = CurriculumConfig()
    run: SkipOrAbortRunConfig  # nothing to roll back to: skip or abort
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=10)

    @field_validator("inner")
    @classmethod
    def _adam(cls, v: InnerOptimConfig) -> InnerOptimConfig:
        if v.name != "adam" or v.momentum or v.weight_decay:
            raise ValueError("Alg. 1 trains the student with plain Adam: set inner.name: adam "
                             "(no momentum, weight_decay 0)")
        return v


def load_images(cfg: ImageDataConfig, device: torch.device) -> tuple[Splits, dict[str, Any]]:
    """Normalised ``[n, 1, 28, 28]`` splits; ``digits`` (8x8) is upsampled to MNIST's shape."""
    return image_splits(cfg.name, data_dir=cfg.data_dir, split_seed=cfg.split_seed, side=28,
                        sizes={"train": cfg.train_size, "val": cfg.val_size,
                               "test": cfg.test_size}, device=device)


def make_problem(
    student: torch.nn.Module, teacher: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]], *, steps: int, lr: float,
    betas: tuple[float, float] = (0.9, 0.999), trace: dict | None = None,
    meta: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> hypergrad.Problem:
    """The inner step ``state_{t+1} = step(state_t, φ, t)`` of Alg. 1 and its meta-loss, from
    the module kit.

    ``state = {"params", "buffers", "opt"}`` (student weights, BN buffers, Adam state), ``φ``
    the teacher's parameters by name; batch ``t`` of ``batches`` is weighted by
    ``c = teacher_φ(x, t / steps)`` (teacher in train mode) and the student takes one
    differentiable Adam step on ``Σ_b c_b·NLL_b``. ``trace[t]`` receives the (detached)
    weights and labels, for the curriculum plots.

    The meta-loss (the seed's) on ``meta = (x, y, batch)``: the mean over batches of
    ``Σ_b NLL_b`` of the trained student, BN in train mode. Without ``meta`` only ``step``
    may be used.
    """

    def train_loss(s: torch.nn.Module, tch: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   t: int) -> torch.Tensor:
        tch.train()  # the seed's: per-batch BN statistics
        c = tch(x, weighting.progress(t, steps))[:, 0]  # [B]
        if trace is not None:
            trace[t] = (c.detach(), y)
        return weighting.weighted_nll(s(x), y, c)

    def meta_loss(s: torch.nn.Module, tch: torch.nn.Module) -> torch.Tensor:
        if meta is None:
            raise ValueError("make_problem(..., meta=(x, y, batch)) is needed for the meta-loss")
        x, y, batch = meta
        s.train()
        return torch.stack([weighting.weighted_nll(s(x[i:i + batch]), y[i:i + batch])
                            for i in range(0, len(y), batch)]).mean()

    return hypergrad.problem(student, train_loss, meta_loss, hparams=teacher, rule=adam,
                             batches=lambda t: (*batches[t], t), lr=lr, betas=betas)


@torch.no_grad()
def accuracy(student: torch.nn.Module, params: dict, buffers: dict, x: torch.Tensor,
             y: torch.Tensor) -> tuple[float, float]:
    """(mean NLL, accuracy) with BN running statistics (eval mode)."""
    student.eval()
    out = torch.cat([call(student, params, buffers, x[i:i + 1000])[0] for i in range(0, len(y), 1000)])
    student.train()
    return F.nll_loss(out, y).item(), (out.argmax(1) == y).float().mean().item()


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Learn φ for ``run.max_steps`` outer steps; return the final meta-loss and accuracies."""
    device = resolve_device(config.run.device)
    data, _ = load_images(config.data, device)
    steps, bs = config.hypergrad.steps, config.data.batch_size
    student = CBRStudent(1, 10).to(device)
    teacher = CBRTeacher(1, iteration_channel=config.teacher.arch == "curr").to(device)
    theta0, student_buffers0 = module_state(student)  # the SAME init every outer step
    phi0, teacher_buffers = module_state(teacher)
    phi = {k: v.requires_grad_() for k, v in phi0.items()}
    opt = config.outer.make(list(phi.values()))
    from bilevel.data import IndexSampler

    sampler = IndexSampler(len(data["train"][1]), bs, seed=config.run.seed, device=device)
    trace: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # t -> (weights, labels), last unroll
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    inner_step, meta_loss = make_problem(student, teacher, batches, steps=steps,
                                         lr=config.inner.lr, betas=config.inner.betas,
                                         trace=trace, meta=(*data["val"], bs))[:2]

    state = RunState(phi=phi, outer_opt=opt, sampler=sampler, theta0=theta0,
                     student_buffers0=student_buffers0)
    start = run_dir.resume(state, save_start=True)

    final: dict[str, float] = {}
    state0 = {"params": theta0, "buffers": student_buffers0, "opt": adam.init(theta0)}
    for step in run_dir.steps(start, config.run.max_steps):
        batches[:] = [(data["train"][0][i], data["train"][1][i]) for i in
                      (next(sampler) for _ in range(steps))]
        r = hypergrad.from_config(config.hypergrad)(inner_step, meta_loss, state0, phi,
                                                    check_finite=False)
        if not all_finite(r.hypergrad, r.outer_loss):
            on_nonfinite(run_dir, config.run.nan_policy, step=step, what="hypergradient")
        else:
            hypergrad.write_grad(r, phi, max_norm=config.outer.grad_clip)
            opt.step()
        last = step == config.run.max_steps
        if step % config.logging.every == 0 or last:
            final = _log(run_dir, step, r, trace, student, data)
        if last or step % config.checkpoint.every == 0:
            _write_outputs(run_dir.path, config, teacher, teacher_buffers, phi, student, r.state,
                           data, trace)
        run_dir.checkpoint(step, state, force=last)
    return final


def _log(run_dir: RunDir, step: int, r: hypergrad.HypergradResult, trace: dict,
         student: torch.nn.Module, data: Splits) -> dict[str, float]:
    w = torch.stack([trace[t][0] for t in sorted(trace)])  # [steps, B]
    k = max(1, len(w) // 10)
    val_loss, val_acc = accuracy(student, r.state["params"], r.state["buffers"], *data["val"])
    test_loss, test_acc = accuracy(student, r.state["params"], r.state["buffers"], *data["test"])
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in r.hypergrad.values())).item()
    values = {"meta/loss": r.outer_loss.item(), "val/loss": val_loss, "val/acc": val_acc,
              "test/loss": test_loss, "test/acc": test_acc, "weights/mean": w.mean().item(),
              "weights/first_tenth": w[:k].mean().item(), "weights/last_tenth": w[-k:].mean().item(),
              "weights/std": w.std().item(), "hypergrad/norm": norm}
    run_dir.log(step, values)
    return values


def _write_outputs(path: Path, config: Config, teacher: CBRTeacher, teacher_buffers: dict,
                   phi: dict, student: torch.nn.Module, final_state: dict, data: Splits,
                   trace: dict) -> None:
    """``teacher.pt`` for the student-evaluation command and ``curriculum.npz`` for the plots."""
    phi_d = {k: v.detach().cpu().clone() for k, v in phi.items()}
    torch.save({"phi": phi_d, "buffers": {k: v.cpu() for k, v in teacher_buffers.items()},
                "arch": config.teacher.arch, "inner_steps": config.hypergrad.steps,
                "inner_lr": config.inner.lr, "data": config.data.name}, path / "teacher.pt")
    n, p = config.curriculum.probe_size, config.curriculum.points
    x, y = data["val"][0][:n], data["val"][1][:n]
    grid = np.linspace(0.0, (config.hypergrad.steps - 1) / config.hypergrad.steps, p)
    with torch.no_grad():
        bs = config.data.batch_size  # the teacher's BN statistics come from batches this size
        weights = np.stack([torch.cat([weighting.example_weights(
            teacher, phi_d, teacher_buffers, x[i:i + bs], progress=float(g)).cpu()
            for i in range(0, len(y), bs)]).numpy() for g in grid])  # [points, n]
        student.eval()
        out = call(student, final_state["params"], final_state["buffers"], x)[0]
        student.train()
        hardness = F.nll_loss(out, y, reduction="none").cpu().numpy()
    unroll_w = torch.stack([trace[t][0] for t in sorted(trace)]).cpu().numpy()
    unroll_y = torch.stack([trace[t][1] for t in sorted(trace)]).cpu().numpy()
    np.savez(path / "curriculum.npz", progress=grid, weights=weights, labels=y.cpu().numpy(),
             hardness=hardness, unroll_weights=unroll_w, unroll_labels=unroll_y)


PROGRESS_MODES = ("clamp", "seed", "stretch")


def student_progress(step: int, *, inner_steps: int, total_steps: int, mode: str) -> float:
    """The iteration-channel value for step ``step`` of a NEW student's training.

    ``seed``: ``step / inner_steps`` (``student_train_weighting.py``; runs far past the
    ``[0, 1)`` the teacher saw); ``clamp``: the same, capped at the last value the teacher saw,
    ``(inner_steps − 1) / inner_steps``; ``stretch``: the whole run mapped onto that range.
    """
    top = (inner_steps - 1) / inner_steps
    if mode == "seed":
        return step / inner_steps
    if mode == "clamp":
        return min(step / inner_steps, top)
    if mode == "stretch":
        return top * step / max(total_steps - 1, 1)
    raise ValueError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")


def train_student(teacher_file: str | Path | None, *, data: Splits, seed: int, epochs: float,
                  lr: float = 1e-4, batch_size: int = 64, arch: str = "cbr",
                  progress_mode: str = "clamp", evals_per_epoch: int = 4,
                  weights: Literal["example", "batch_mean"] = "example",
                  device: torch.device | None = None) -> dict[str, list[float]]:
    """Train a new student with a learned teacher weighting its loss (``None``: the baseline).

    The seed's evaluation protocol (``student_train_weighting.py``): Adam(lr) at batch 64 on
    ``Σ_b c_b·NLL_b`` (``c ≡ 1`` for the baseline), teacher in train mode; accuracy on the
    test split and a 2,000-image train subsample at step 0 and every ``1/evals_per_epoch``
    epoch. Returns the curves ``{"step", "epoch", "test_acc", "test_loss", "train_acc"}``.

    ``weights="batch_mean"`` is a control: every example of a batch gets the batch's mean
    teacher weight, which keeps the teacher's weight-over-time schedule and drops its
    per-example and per-class differences.
    """
    from bilevel.data import IndexSampler
    from bilevel.models import resnet18

    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    student = (CBRStudent(1, 10) if arch == "cbr" else resnet18(10, in_channels=1)).to(device)
    teacher, phi, t_buf, inner_steps = None, {}, {}, 100
    if teacher_file is not None:
        saved = torch.load(teacher_file, weights_only=True)
        teacher = CBRTeacher(1, iteration_channel=saved["arch"] == "curr").to(device)
        phi = {k: v.to(device) for k, v in saved["phi"].items()}
        t_buf = {k: v.to(device) for k, v in saved["buffers"].items()}
        inner_steps = int(saved["inner_steps"])
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    x, y = data["train"]
    sampler = IndexSampler(len(y), batch_size, seed=seed, device=device)
    total = round(epochs * sampler.steps_per_epoch)
    points = {min(total, round(k * sampler.steps_per_epoch / evals_per_epoch))
              for k in range(int(epochs * evals_per_epoch) + 1)} | {total}
    curves: dict[str, list[float]] = {k: [] for k in ("step", "epoch", "test_acc", "test_loss", "train_acc")}
    for step in range(total + 1):
        if step in points:
            params, buffers = module_state(student)
            test_loss, test_acc = accuracy(student, params, buffers, *data["test"])
            curves["step"].append(step)
            curves["epoch"].append(step / sampler.steps_per_epoch)
            curves["test_acc"].append(test_acc)
            curves["test_loss"].append(test_loss)
            curves["train_acc"].append(accuracy(student, params, buffers, x[:2000], y[:2000])[1])
        if step == total:
            break
        idx = next(sampler)
        c = None
        if teacher is not None:
            with torch.no_grad():
                p = student_progress(step, inner_steps=inner_steps, total_steps=total, mode=progress_mode)
                c = weighting.example_weights(teacher, phi, t_buf, x[idx], progress=p)
                if weights == "batch_mean":
                    c = c.mean().expand_as(c)
        student.train()
        loss = weighting.weighted_nll(student(x[idx]), y[idx], c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curves
