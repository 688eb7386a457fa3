"""auxilearn's data and tasks: the labelled pool, the auxiliary set, the unlabelled pool, the
multi-task network and the per-example loss matrix.

Auxiliary tasks:

* label-derived, on the labelled images: ``parity`` (class index even/odd), ``gt4`` (class
  index > 4), ``noise`` (a fixed random 10-class label per image, deliberately harmful);
* self-supervised, on the unlabelled pool when ``tasks.unlabelled > 0`` (else on the labelled
  images): ``rotation`` (which multiple of 90° the image was turned by, 4 classes) and
  ``flip`` (none / left-right / up-down / both, 4 classes).

The rotation and flip of example ``b`` at step ``t`` are ``(idx_b + t) % 4`` and
``(idx_b + 2t + 1) % 4``: deterministic, so a resumed run needs no extra RNG state.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from bilevel.data import load_dataset
from bilevel.run import Section
from bilevel.run.schema import Width

TASKS = {"parity": 2, "gt4": 2, "rotation": 4, "flip": 4, "noise": 10}  # task -> classes
SELF_SUPERVISED = ("rotation", "flip")
SIDE = {"mnist": 28, "fashion_mnist": 28, "digits": 8}


class NetSection(Section):
    """The MLP trunk (ReLU, as the authors'); the heads follow from the tasks."""

    name: Literal["mlp"] = "mlp"
    hidden: list[Width] = Field(default_factory=list, max_length=64)


class _Cfg(Protocol):  # the parts of auxilearn.Config read here
    data: Any
    tasks: Any
    meta: Any
    method: str


def splits(config: _Cfg, device: torch.device) -> dict[str, Any]:
    """Labelled pool (class-balanced, fixed by ``data.split_seed``), auxiliary set, validation
    subset, test set and, with ``tasks.unlabelled``, the unlabelled pool.

    The auxiliary set (``meta.aux_per_class`` images per class) is held out of the labelled
    pool for the learned methods, and for every method with ``tasks.baselines_hold_out``.
    The unlabelled pool is drawn from the training images outside the labelled pool, after
    every other draw, so configs without it see the same splits as before it existed."""
    ds = load_dataset(config.data.name, data_dir=config.data.data_dir)
    side = SIDE[config.data.name]
    img = lambda x: x.reshape(len(x), 1, side, side).to(device)  # noqa: E731
    g = torch.Generator().manual_seed(config.data.split_seed)
    learned = config.method in ("linear", "nonlinear")
    hold = config.meta.aux_per_class if learned or config.tasks.baselines_hold_out else 0
    train_idx, aux_idx = [], []
    for c in range(10):
        idx = torch.nonzero(ds.train.y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)[:config.tasks.labels_per_class]]
        train_idx.append(idx[hold:])
        aux_idx.append(idx[:hold])
    pool = torch.cat(train_idx)
    noise = torch.randint(0, 10, (len(ds.train.y),), generator=g)  # fixed random labels
    val = torch.randperm(len(ds.val.y), generator=g)[: config.tasks.val_size]
    out = {"train": (img(ds.train.x[pool]), ds.train.y[pool].to(device), noise[pool].to(device)),
           "val": (img(ds.val.x[val]), ds.val.y[val].to(device)),
           "test": (img(ds.test.x), ds.test.y.to(device))}
    if learned:
        aux = torch.cat(aux_idx)
        out["aux"] = (img(ds.train.x[aux]), ds.train.y[aux].to(device))
    if n := config.tasks.unlabelled:
        labelled = torch.zeros(len(ds.train.y), dtype=torch.bool)
        labelled[torch.cat(train_idx + aux_idx)] = True
        rest = torch.nonzero(~labelled).squeeze(1)
        if n > len(rest):
            raise ValueError(f"tasks.unlabelled: {n} asked, only {len(rest)} training images "
                             "are outside the labelled pool")
        out["unlabelled"] = img(ds.train.x[rest[torch.randperm(len(rest), generator=g)[:n]]])
    return out


class MultiTaskNet(nn.Module):
    """A shared MLP trunk over the flattened image and one linear head per task."""

    def __init__(self, in_dim: int, hidden: list[int], heads: dict[str, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(in_dim, n) for k, n in heads.items()})

    def forward(self, x: Tensor, head: str) -> Tensor:
        return self.heads[head](self.trunk(x))


def _transform(x: Tensor, code: Tensor, task: str) -> Tensor:
    """Rotate (``code`` × 90°) or flip (bit 0: left-right, bit 1: up-down) each image."""
    out = torch.empty_like(x)
    for k in range(4):
        m = code == k
        if task == "rotation":
            out[m] = torch.rot90(x[m], k, (2, 3))
        else:
            dims = [d for d, bit in ((3, 1), (2, 2)) if k & bit]
            out[m] = torch.flip(x[m], dims) if dims else x[m]
    return out


def per_task_losses(model: MultiTaskNet, x: Tensor, y: Tensor, noise: Tensor, idx: Tensor,
                    step: int, tasks: list[str], unlabelled: Tensor | None = None,
                    u_idx: Tensor | None = None) -> Tensor:
    """The per-example loss matrix ``[B, 1 + len(tasks)]``, main task first.

    Row ``b`` holds labelled example ``b``'s main and label-derived losses and, with an
    unlabelled batch (of the same size), unlabelled example ``b``'s self-supervised losses:
    the pairing of rows is arbitrary, and the combiners treat each row as one example."""
    z = model.trunk(x)
    targets = {"parity": y % 2, "gt4": (y > 4).long(), "noise": noise}
    cols = [F.cross_entropy(model.heads["main"](z), y, reduction="none")]
    xs, ids = (x, idx) if unlabelled is None else (unlabelled, u_idx)
    assert ids is not None
    for t in tasks:
        if t in SELF_SUPERVISED:
            code = (ids + step) % 4 if t == "rotation" else (ids + 2 * step + 1) % 4
            cols.append(F.cross_entropy(model(_transform(xs, code, t), t), code, reduction="none"))
        else:
            cols.append(F.cross_entropy(model.heads[t](z), targets[t], reduction="none"))
    return torch.stack(cols, 1)  # [B, T]


@torch.no_grad()
def accuracy(model: MultiTaskNet, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x, "main").argmax(1) == y).float().mean())
