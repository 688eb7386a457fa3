"""auxilearn_labels: learn *new* auxiliary labels by implicit differentiation (AuxiLearn §4).

The second half of Navon et al. (ICLR 2021): instead of weighting given auxiliary tasks, a
label-generating network ``g_φ`` invents one. Each class ``c`` owns ``k`` auxiliary
sub-classes; for an image ``x`` of class ``y`` the generator's logits ``g_φ(x) ∈ ℝ^{C·k}`` are
soft-maxed over the ``k`` sub-classes of ``y`` only (zero elsewhere), giving a soft auxiliary
label ``t_φ(x, y)``. The primary net (shared MLP trunk, a main head with ``C`` outputs and an
auxiliary head with ``C·k``) trains on

    L_T(w, φ) = mean_b [ ℓ(main(x_b), onehot(y_b)) + s · ℓ(aux(x_b), t_φ(x_b, y_b)) ]

with ``ℓ`` the authors' focal loss ``Σ_c −t_c (1 − p_c)^γ log p_c`` (γ = 2; or plain
cross-entropy) and ``s = labels.aux_scale``. Every ``meta.every`` primary steps, as in the
authors' ``experiments/oxford_pet``, ``φ`` takes one step along the implicit hypergradient of
the main-task loss on the *auxiliary set* (labelled images held out of the training pool)::

    L_A = main-task loss on the auxiliary set (all of it)
    L_T = the training loss above on one fresh training batch
    MetaOptimizer.step(train_loss=L_T, val_loss=L_A, parameters=w, aux_params=φ)

(``α = meta.hpo_lr``, default the primary lr; ``K = meta.truncate_iter``). ``labels.learn:
false`` freezes the generator at its initialisation: the unlearned twin, same data, same
init, same batches. The authors also learn a loss combiner jointly; here the combination is
fixed (``s``), so the comparison isolates the labels.

Run it::

    bilevel run auxilearn_labels/fashion_mnist.yaml --out runs/auxilearn/labels
    bilevel run auxilearn_labels/fashion_mnist.yaml --set labels.learn=false --out runs/auxilearn/labels-frozen
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from bilevel.data import IndexSampler, load_dataset
from bilevel.hypergrad import MetaOptimizer
from bilevel.recipes.auxilearn.tasks import NetSection
from bilevel.run import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    RunDir,
    RunState,
    Section,
    SGDConfig,
    SkipOrAbortRunConfig,
    on_nonfinite,
    resolve_device,
)


class LabelsConfig(Section):
    """The label generator and the auxiliary task it defines."""

    sub_classes: int = Field(5, gt=1, description="auxiliary sub-classes per class (authors: 5)")
    aux_scale: float = Field(0.25, ge=0.0, description="weight s of the auxiliary loss")
    loss: Literal["focal", "cross_entropy"] = "focal"
    gamma: float = Field(2.0, ge=0.0, description="focal loss exponent (authors: 2)")
    hidden: list[int] = Field([64], description="generator MLP hidden widths")
    learn: bool = Field(True, description="false: generator frozen at its init (the twin)")


class MetaConfig(Section):
    """The hyper-step: held-out auxiliary set, MetaOptimizer settings, meta-optimiser."""

    aux_per_class: int = Field(2, gt=0, description="labelled images per class held out")
    every: int = Field(5, gt=0, description="hyper-step every N primary steps")
    batch_size: int = Field(32, gt=0, description="training batch of L_T in the hyper-step")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(1e-2, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-3, ge=0.0, description="authors: 5e-3")
    hpo_lr: float | None = Field(None, gt=0.0, description="Neumann α (None: inner.lr)")
    truncate_iter: int = Field(3, ge=0)
    max_grad_norm: float | None = Field(50.0, gt=0.0, description="authors: 50")


class Config(Section):
    """auxilearn_labels' config."""

    data: DataConfig = DataConfig(name="fashion_mnist", batch_size=32)
    labels_per_class: int = Field(20, gt=1, description="labelled images per class in the pool")
    val_size: int = Field(1000, gt=0, description="validation images (model selection, report)")
    model: NetSection = NetSection(hidden=[256, 128])
    inner: SGDConfig = SGDConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)  # the authors'
    labels: LabelsConfig = LabelsConfig()
    meta: MetaConfig = MetaConfig()
    eval_every: int = Field(100, gt=0)
    run: SkipOrAbortRunConfig  # nothing to roll back to
    logging: LoggingConfig = LoggingConfig(every=50)
    checkpoint: CheckpointConfig = CheckpointConfig(every=500)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.data.name not in ("mnist", "fashion_mnist", "digits"):
            raise ValueError(f"data.name must be mnist, fashion_mnist or digits, got "
                             f"{self.data.name!r}")
        if self.meta.aux_per_class >= self.labels_per_class:
            raise ValueError(f"meta.aux_per_class ({self.meta.aux_per_class}) must be below "
                             f"labels_per_class ({self.labels_per_class}): the auxiliary set "
                             "is held out of the labelled pool")
        return self


def mlp(in_dim: int, hidden: list[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    return nn.Sequential(*layers), in_dim


class LabelGenerator(nn.Module):
    """``t_φ(x, y)``: a softmax over the ``k`` sub-classes of class ``y``, zero elsewhere."""

    def __init__(self, in_dim: int, hidden: list[int], num_classes: int, sub_classes: int) -> None:
        super().__init__()
        self.trunk, width = mlp(in_dim, hidden)
        self.out = nn.Linear(width, num_classes * sub_classes)
        self.num_classes, self.sub_classes = num_classes, sub_classes

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.trunk(x)).view(len(y), self.num_classes, self.sub_classes)
        own = logits[torch.arange(len(y), device=y.device), y].softmax(-1)  # [B, k]
        soft = torch.zeros_like(logits).index_put((torch.arange(len(y), device=y.device), y), own)
        return soft.flatten(1)  # [B, C*k], rows sum to 1 on class y's block


class PrimaryNet(nn.Module):
    """Shared MLP trunk, a main head (``C``) and an auxiliary head (``C·k``)."""

    def __init__(self, in_dim: int, hidden: list[int], num_classes: int, sub_classes: int) -> None:
        super().__init__()
        self.trunk, width = mlp(in_dim, hidden)
        self.main = nn.Linear(width, num_classes)
        self.aux = nn.Linear(width, num_classes * sub_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return self.main(z), self.aux(z)


def soft_loss(logits: torch.Tensor, target: torch.Tensor, *, kind: str, gamma: float
              ) -> torch.Tensor:
    """Per-example ``Σ_c −t_c (1 − p_c)^γ log p_c`` (focal) or ``−Σ_c t_c log p_c``."""
    logp = logits.log_softmax(-1)
    if kind == "focal":
        logp = (1 - logp.exp()) ** gamma * logp
    return -(target * logp).sum(-1)


def _splits(config: Config, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Class-balanced labelled pool, auxiliary set held out of it, validation subset, test."""
    ds = load_dataset(config.data.name, config.data.data_dir, split_seed=config.data.split_seed,
                      normalize=config.data.name != "digits")
    g = torch.Generator().manual_seed(config.data.split_seed)
    hold, pool, aux = config.meta.aux_per_class, [], []
    for c in range(int(ds.info["num_classes"])):
        idx = torch.nonzero(ds.train.y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)[:config.labels_per_class]]
        pool.append(idx[hold:])
        aux.append(idx[:hold])
    val = torch.randperm(len(ds.val.y), generator=g)[:config.val_size]
    flat = lambda x: x.reshape(len(x), -1).float().to(device)  # noqa: E731
    p, a = torch.cat(pool), torch.cat(aux)
    return {"train": (flat(ds.train.x[p]), ds.train.y[p].to(device)),
            "aux": (flat(ds.train.x[a]), ds.train.y[a].to(device)),
            "val": (flat(ds.val.x[val]), ds.val.y[val].to(device)),
            "test": (flat(ds.test.x), ds.test.y.to(device))}


@torch.no_grad()
def evaluate(net: PrimaryNet, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Main-task (cross-entropy, accuracy)."""
    net.eval()
    out = net(x)[0]
    net.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train the primary net with generated auxiliary labels; learn the generator unless frozen."""
    device = resolve_device(config.run.device)
    data = _splits(config, device)
    (x_tr, y_tr), lc, m = data["train"], config.labels, config.meta
    num_classes, in_dim = int(data["test"][1].max()) + 1, x_tr.shape[1]
    torch.manual_seed(config.run.seed)  # the same init for the learned arm and its frozen twin
    net = PrimaryNet(in_dim, config.model.hidden, num_classes, lc.sub_classes).to(device)
    gen = LabelGenerator(in_dim, lc.hidden, num_classes, lc.sub_classes).to(device)
    inner = config.inner
    opt = torch.optim.SGD(net.parameters(), lr=inner.lr, weight_decay=inner.weight_decay,
                          momentum=inner.momentum)
    meta_inner = (torch.optim.SGD(gen.parameters(), lr=m.lr, momentum=m.momentum,
                                  weight_decay=m.weight_decay) if m.optimizer == "sgd" else
                  torch.optim.Adam(gen.parameters(), lr=m.lr, weight_decay=m.weight_decay))
    meta_opt = MetaOptimizer(meta_inner, hpo_lr=m.hpo_lr or inner.lr,
                             truncate_iter=m.truncate_iter, max_grad_norm=m.max_grad_norm,
                             on_divergence="identity")
    sampler = IndexSampler(len(y_tr), config.data.batch_size, seed=config.run.seed)
    meta_sampler = IndexSampler(len(y_tr), min(m.batch_size, len(y_tr)), seed=config.run.seed + 2)
    best = {"val/acc": -1.0, "test/acc_at_best_val": 0.0, "best_step": 0.0}

    def train_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = x_tr[idx], y_tr[idx]
        main, aux = net(x)
        l_main = soft_loss(main, F.one_hot(y, num_classes).float(), kind=lc.loss, gamma=lc.gamma)
        l_aux = soft_loss(aux, gen(x, y), kind=lc.loss, gamma=lc.gamma)
        return (l_main + lc.aux_scale * l_aux).mean(), l_main.mean(), l_aux.mean()

    state = RunState(net=net, opt=opt, gen=gen, meta_opt=meta_opt, sampler=sampler,
                     meta_sampler=meta_sampler, best=best)
    start = run_dir.resume(state)

    for step in run_dir.steps(start, config.run.max_steps):
        net.train()
        loss, l_main, l_aux = train_loss(next(sampler))
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
        else:  # skip (or abort): a non-finite loss would poison the weights
            on_nonfinite(run_dir, config.run.nan_policy, step=step, what="training loss")
        record: dict[str, float] = {}
        if step % m.every == 0:
            # the twin draws the same batch so both arms see identical data streams
            idx = next(meta_sampler)
            x_a, y_a = data["aux"]
            val_loss = F.cross_entropy(net(x_a)[0], y_a)
            record["meta/aux_loss"] = float(val_loss.detach())  # the meta objective, both arms
            if lc.learn:
                meta_loss = train_loss(idx)[0]
                if torch.isfinite(val_loss) and torch.isfinite(meta_loss):
                    meta_opt.step(train_loss=meta_loss, val_loss=val_loss,
                                  parameters=list(net.parameters()),
                                  aux_params=list(gen.parameters()))
                    record["meta/grad_norm"] = meta_opt.last_info["grad_norm"]
                else:
                    on_nonfinite(run_dir, config.run.nan_policy, step=step, what="meta-step loss")
        if step % config.eval_every == 0 or step == config.run.max_steps:
            val_loss_, val_acc = evaluate(net, *data["val"])
            test_acc = evaluate(net, *data["test"])[1]
            record |= {"val/loss": val_loss_, "val/acc": val_acc, "test/acc": test_acc}
            if val_acc > best["val/acc"]:
                best.update({"val/acc": val_acc, "test/acc_at_best_val": test_acc,
                             "best_step": float(step)})
        if step % config.logging.every == 0 or step == config.run.max_steps:
            record |= {"train/loss": float(loss.detach()), "train/main": float(l_main.detach()),
                       "train/aux": float(l_aux.detach())}
        if record:
            run_dir.log(step, record)
        run_dir.checkpoint(step, state, force=step == config.run.max_steps)

    val_loss_f, val_acc_f = evaluate(net, *data["val"])
    return {"val/loss_final": val_loss_f, "val/acc_final": val_acc_f,
            "meta/aux_loss_final": evaluate(net, *data["aux"])[0],
            "test/acc": evaluate(net, *data["test"])[1], **best}
