"""commentaries_blending: learn label-pair blending proportions by implicit differentiation.

Commentaries Alg. 2 (Raghu et al., ICLR 2021; seeds.md §1.6). A ``C×C`` logit matrix ``M``
(init −1) sets ``λ_ij = 1 − 0.5σ(M_ij)``; every iteration the network takes one Adam step on
the blended two-target loss (:mod:`bilevel.meta.blending`), then ``M`` takes one Adam step
along the implicit hypergradient of the clean validation loss at the current weights:

    Φ(w) = w − α ∇_w L_T(w, M)        (on a fresh blended train batch; α = inner lr)
    dL_V/dM = −(∂²L_T/∂M∂w) · α Σ_{j=0..K} (I − αH)^j ∇_w L_V      (Lorraine et al., K = 1)

computed by :func:`bilevel.hypergrad.implicit` (solver ``neumann`` with ``terms=K+1`` and the
engine's own ``alpha=1``: the α lives in Φ). A series that grows falls back to K = 0 and
is logged (``hyper/fallback``). ``blending.warmup_epochs`` delays hyper-steps (the seed's
``--warmup_epochs``: hyper-steps happen when ``epoch > warmup_epochs``).

Run it::

    bilevel run commentaries_blending/mnist_cbr.yaml --out runs/commentaries/blend

Outputs beside the usual run files: ``blending.pt`` (``M``, read by
``bilevel commentaries blend-eval``), ``heatmaps/lambda-step{N}.png`` every
``blending.heatmap_every`` iterations and ``lambda.png`` at the end.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from bilevel import hypergrad
from bilevel.data import IndexSampler
from bilevel.errors import HypergradWarning
from bilevel.meta import blending
from bilevel.models import CBRStudent, resnet18
from bilevel.recipes.commentaries.plots import plot_lambda
from bilevel.recipes.commentaries.weighting import ImageDataConfig, load_images
from bilevel.run import (
    CheckpointConfig,
    Implicit,
    LoggingConfig,
    OuterOptimConfig,
    RunDir,
    RunState,
    Section,
    SkipOrAbortRunConfig,
    all_finite,
    on_nonfinite,
    resolve_device,
)
from bilevel.run.schema import Beta


class NetConfig(Section):
    """The network trained with blending: the CBR student or a CIFAR-style ResNet-18."""

    name: Literal["cbr", "resnet18"] = "cbr"


class BlendingConfig(Section):
    """The learned commentary ``M`` and how often its heat-map is drawn."""

    init: float = Field(blending.INIT_LOGIT, description="initial logit of every M_ij (seed: -1)")
    warmup_epochs: int = Field(-1, ge=-1, description="hyper-steps when epoch > this (-1: always)")
    heatmap_every: int = Field(100, gt=0, description="iterations between heat-map PNGs")


class InnerSection(Section):
    """The network's optimiser: Adam, as in the seed."""

    name: Literal["adam"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)


class Config(Section):
    """Alg. 2's config (defaults: the seed's MNIST settings; epochs = run.max_steps iterations)."""

    data: ImageDataConfig = ImageDataConfig(batch_size=128, val_size=None, test_size=2000)
    model: NetConfig = NetConfig()
    inner: InnerSection = InnerSection()
    outer: OuterOptimConfig = OuterOptimConfig(name="adam", lr=1e-2)
    hypergrad: Implicit = Implicit(solver="neumann", iters=1)
    blending: BlendingConfig = BlendingConfig()
    run: SkipOrAbortRunConfig  # nothing to roll back to: skip or abort
    logging: LoggingConfig = LoggingConfig(every=100)
    checkpoint: CheckpointConfig = CheckpointConfig(every=200)

    @field_validator("hypergrad")
    @classmethod
    def _not_exact(cls, v: Implicit) -> Implicit:
        if v.solver == "exact":
            raise ValueError("hypergrad.solver 'exact' builds a dense Hessian: use neumann, cg, "
                             "minres or identity")
        return v


def build_net(name: str, num_classes: int = 10) -> nn.Module:
    """``cbr`` (log-probabilities) or ``resnet18`` (1 input channel)."""
    return CBRStudent(1, num_classes) if name == "cbr" else resnet18(num_classes, in_channels=1)


def perm_for(seed: int, step: int, stream: int, n: int) -> torch.Tensor:
    """The blending partner permutation of iteration ``step``: a pure function of its inputs,
    so resume needs no generator state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + stream)
    return torch.randperm(n, generator=gen)


def blend_problem(net: nn.Module, m: torch.Tensor, train: tuple, val: tuple, perm: torch.Tensor,
                  *, alpha: float) -> hypergrad.Problem:
    """The kit's problem at the network's current weights: ``Φ(w) = w − α ∇_w L_T(w, M)``, a
    gradient step on one blended batch, and the clean cross-entropy of one validation batch
    (BN in train mode, as the seed; running statistics are not part of the fixed point)."""
    (x, y), (xv, yv) = train, val

    def train_loss(model: nn.Module, hp: dict[str, torch.Tensor], _t: int) -> torch.Tensor:
        xb, lam = blending.blend(x, y, hp["M"], perm)
        return blending.blended_loss(model(xb), y, perm, lam)

    net.train()
    return hypergrad.problem(net, train_loss, lambda model, hp: F.cross_entropy(model(xv), yv),
                             hparams={"M": m}, lr=alpha)


def hyper_step(net: nn.Module, m: torch.Tensor, train: tuple, val: tuple, perm: torch.Tensor, *,
               cfg: Implicit, alpha: float) -> hypergrad.HypergradResult:
    """The implicit hypergradient ``dL_V/dM`` at the network's current weights."""
    # Commentaries Alg. 2 applies the IFT with a few Neumann terms at the current weights,
    # not at a converged fixed point, by design: the engine's convergence warnings would
    # fire on every hyper step. The term norms stay in the result's info.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradWarning)
        return hypergrad.from_config(cfg)(*blend_problem(net, m, train, val, perm, alpha=alpha),
                                          alpha=1.0, on_divergence="identity", check_finite=False)


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) in eval mode."""
    net.eval()
    out = torch.cat([net(x[i:i + 1000]) for i in range(0, len(y), 1000)])
    net.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train the network and ``M`` together for ``run.max_steps`` iterations."""
    device = resolve_device(config.run.device)
    data, info = load_images(config.data, device)
    num_classes, bs, seed = int(info["num_classes"]), config.data.batch_size, config.run.seed
    net = build_net(config.model.name, num_classes).to(device)
    m = blending.init_logits(num_classes, value=config.blending.init, device=device)
    opt_w = torch.optim.Adam(net.parameters(), lr=config.inner.lr, betas=config.inner.betas)
    opt_m = config.outer.make([m])
    alpha = config.hypergrad.alpha or config.inner.lr  # Φ's step size: the inner lr (the seed's)
    samplers = {name: IndexSampler(len(data[split][1]), bs, seed=seed + i, device=device)
                for i, (name, split) in enumerate([("train", "train"), ("hyper", "train"), ("val", "val")])}
    window = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "fallbacks": 0.0}

    state = RunState(net=net, opt_w=opt_w, m=m, opt_m=opt_m, window=window, samplers=samplers)
    start = run_dir.resume(state, save_start=True)

    final: dict[str, float] = {}
    per_epoch = samplers["train"].steps_per_epoch
    for step in run_dir.steps(start, config.run.max_steps):
        # 1. one Adam step of the network on the blended loss (M fixed)
        idx = next(samplers["train"])
        x, y = data["train"][0][idx], data["train"][1][idx]
        perm = perm_for(seed, step, 0, len(y)).to(device)
        net.train()
        xb, lam = blending.blend(x, y, m.detach(), perm)
        out = net(xb)
        loss = blending.blended_loss(out, y, perm, lam)
        opt_w.zero_grad(set_to_none=True)
        loss.backward()
        opt_w.step()
        window["loss"] += loss.item() * len(y)
        window["correct"] += (out.argmax(1) == y).sum().item()
        window["seen"] += len(y)
        # 2. one hyper-step of M (after the warm-up)
        r = None
        if (step - 1) // per_epoch > config.blending.warmup_epochs:
            ih, iv = next(samplers["hyper"]), next(samplers["val"])
            r = hyper_step(net, m, (data["train"][0][ih], data["train"][1][ih]),
                           (data["val"][0][iv], data["val"][1][iv]),
                           perm_for(seed, step, 1, len(ih)).to(device), cfg=config.hypergrad, alpha=alpha)
            window["fallbacks"] += float("fallback" in r.info)
            if all_finite(r.hypergrad):
                hypergrad.write_grad(r, {"M": m}, max_norm=config.outer.grad_clip)
                opt_m.step()
            else:
                on_nonfinite(run_dir, config.run.nan_policy, step=step, what="hypergradient")
        last = step == config.run.max_steps
        if step % config.logging.every == 0 or last:
            final = _log(run_dir, step, net, m, r, window, data, per_epoch)
        if step % config.blending.heatmap_every == 0 or last:
            _save_grid(run_dir.path, m, step, last=last, model=config.model.name)
        run_dir.checkpoint(step, state, force=last)
    return final


def _log(run_dir: RunDir, step: int, net: nn.Module, m: torch.Tensor,
         r: hypergrad.HypergradResult | None, window: dict[str, float], data: dict, per_epoch: int
         ) -> dict[str, float]:
    lam = blending.proportions(m.detach())
    val_loss, val_acc = evaluate(net, data["val"][0][:2000], data["val"][1][:2000])
    test_loss, test_acc = evaluate(net, *data["test"])
    seen = max(window["seen"], 1.0)
    values = {"epoch": step / per_epoch, "train/loss": window["loss"] / seen,
              "train/acc": window["correct"] / seen, "val/loss": val_loss, "val/acc": val_acc,
              "test/loss": test_loss, "test/acc": test_acc, "lambda/mean": lam.mean().item(),
              "lambda/min": lam.min().item(), "lambda/max": lam.max().item(),
              "hyper/fallbacks": window["fallbacks"]}
    if r is not None:
        values["hypergrad/norm"] = r.hypergrad["M"].norm().item()
        values["hyper/val_loss"] = r.outer_loss.item()
    run_dir.log(step, values)
    window.update(loss=0.0, correct=0.0, seen=0.0, fallbacks=0.0)
    return values


def _save_grid(path: Path, m: torch.Tensor, step: int, *, last: bool, model: str) -> None:
    torch.save({"m": m.detach().cpu().clone(), "step": step, "model": model}, path / "blending.pt")
    lam = blending.proportions(m.detach().cpu())
    (path / "heatmaps").mkdir(exist_ok=True)
    plot_lambda(lam, path / "heatmaps" / f"lambda-step{step}.png", title=f"λ after {step} iterations")
    if last:
        plot_lambda(lam, path / "lambda.png", title=f"learned λ ({step} iterations)")


def train_blended(logits: torch.Tensor | None, *, data: dict, seed: int, epochs: float,
                  model: str = "cbr", lr: float = 0.1, batch_size: int = 128,
                  device: torch.device | None = None) -> dict[str, float]:
    """Train a fresh network with fixed blending logits (``None``: plain cross-entropy).

    The seed's evaluation protocol (``test_mixup.py``): SGD(lr 0.1, momentum 0.9, Nesterov,
    weight decay 5e-4), batch 128, learning rate ×0.1 at 30%, 60% and 80% of training (the
    seed's epochs 30/60/80 of 100), blended two-target loss with a new partner permutation
    per batch. Returns final test and train-subsample loss/accuracy.
    """
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    net = build_net(model).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = data["train"]
    sampler = IndexSampler(len(y), batch_size, seed=seed, device=device)
    total = max(1, round(epochs * sampler.steps_per_epoch))
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(total * f) for f in (0.3, 0.6, 0.8)], gamma=0.1)
    gen = torch.Generator().manual_seed(seed + 10_000)
    m = None if logits is None else logits.detach().to(device)
    for _ in range(total):
        idx = next(sampler)
        xb, yb = x[idx], y[idx]
        net.train()
        if m is None:
            loss = F.cross_entropy(net(xb), yb)
        else:
            perm = torch.randperm(len(yb), generator=gen).to(device)
            xm, lam = blending.blend(xb, yb, m, perm)
            loss = blending.blended_loss(net(xm), yb, perm, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    test_loss, test_acc = evaluate(net, *data["test"])
    train_loss, train_acc = evaluate(net, x[:5000], y[:5000])
    return {"test_loss": test_loss, "test_acc": test_acc, "train_loss": train_loss,
            "train_acc": train_acc, "steps": float(total)}
