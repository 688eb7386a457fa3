"""onepass's inner problem: data, model, losses, batches and evaluation for Clarke et al.'s
four task families (seeds.md §3.3).

* ``regression`` (the eight UCI sets): MLP ``[d, 50, 1]``, mean squared error on z-scored
  targets; ``*/loss_unnormalised`` multiplies by ``y_std²`` (and Kin8nm's ×1000).
* ``classification`` (Fashion-MNIST, CIFAR-10): cross-entropy, accuracy and error.
* ``language_model`` (Penn Treebank): token streams laid out as ``[steps, n]`` columns,
  truncated back-propagation through ``bptt`` steps with the hidden state carried (detached)
  from batch to batch; perplexity = ``exp(loss)``.

Losses are always taken in train mode (batch statistics for BatchNorm), as in the seed;
evaluation uses eval mode in chunks of ``eval_batch_size``. Everything that changes while
training (samplers, BatchNorm running statistics, the LSTM hidden state) is in
:meth:`Task.state_dict`, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from bilevel.data import Dataset, IndexSampler, Split, batchify, load_dataset
from bilevel.functional import call
from bilevel.models import MLP, LSTMLanguageModel, resnet18
from bilevel.run import Section
from bilevel.run.schema import MAX_SEED, Width

Batch = tuple[Any, ...]


class DataSection(Section):
    """Which data set and how it is batched."""

    name: str = Field("uci_energy", description="a bilevel data set name (`bilevel data list`)")
    data_dir: str | None = None
    split_seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: the publisher's/seed's fixed split")
    val_size: int | None = Field(None, ge=1, description="None: the seed's validation size")
    batch_size: int | None = Field(None, gt=0, description="None: full batch")
    bptt: int = Field(70, gt=0, description="language models: steps per batch")
    eval_batch_size: int = Field(1000, gt=0)
    standardize: bool = Field(False, description="z-score every input feature with the mean "
                              "and std of train+validation (Clarke et al.'s normalise_inputs)")


class ModelSection(Section):
    """The network: ``mlp`` (widths ``[d_in, *hidden, d_out]``), ``resnet18`` or ``lstm``."""

    name: Literal["mlp", "resnet18", "lstm"] = "mlp"
    hidden: list[Width] = Field(default_factory=lambda: [50])
    batch_norm: bool = False
    embedding_dim: int = Field(650, gt=0)
    hidden_size: int = Field(650, gt=0)
    num_layers: int = Field(2, gt=0)


@dataclass
class Task:
    """Data on the device plus the model; ``loss`` is pure in ``params``."""

    kind: str
    model: nn.Module
    splits: dict[str, Split]
    info: dict[str, Any]
    batch_size: int
    bptt: int
    eval_batch_size: int
    buffers: dict[str, Tensor] = field(default_factory=dict)
    samplers: dict[str, IndexSampler] = field(default_factory=dict)
    position: int = 0
    hidden: Any = None

    # -- losses -------------------------------------------------------------------------------
    def loss(self, params: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        """Training-mode loss of one batch and what it changes (buffers, hidden state)."""
        self.model.train()
        bufs: dict[str, Tensor] = {}

        def forward(*args: Any) -> Any:  # the model on ``params``, keeping its new buffers
            out, new = call(self.model, params, self.buffers, *args)
            bufs.update(new)
            return out

        loss, hidden = self._batch_loss(forward, batch)
        return loss, {"buffers": bufs} | ({"hidden": hidden} if self.kind == "language_model" else {})

    def module_loss(self, model: nn.Module, hparams: Any, *batch: Any) -> tuple[Tensor, Any]:
        """:meth:`loss` for the module kit (:func:`bilevel.hypergrad.problem`): the model is
        called as usual, inside the kit's ``functional_call``; the aux is the LSTM's new hidden
        state, detached (``()`` for the other tasks: ``torch.func.grad`` refuses a None aux)."""
        loss, hidden = self._batch_loss(model, batch)
        return loss, () if hidden is None else hidden

    def _batch_loss(self, forward: Any, batch: Batch) -> tuple[Tensor, Any]:
        """The loss of ``batch`` through ``forward`` (the model, or a functional call of it),
        and the LSTM's new hidden state, detached (None for the other tasks)."""
        if self.kind == "language_model":
            x, y, hidden = batch
            logits, new_hidden = forward(x, hidden)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            return loss, LSTMLanguageModel.detach_hidden(new_hidden)
        x, y = batch
        return self._criterion(forward(x), y), None

    def _criterion(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out, y) if self.kind == "regression" else F.cross_entropy(out, y)

    def commit(self, aux: dict[str, Any]) -> None:
        """Keep what a real (not hypothetical) weight step changed."""
        self.buffers = aux["buffers"]
        if "hidden" in aux:
            self.hidden = aux["hidden"]

    # -- batches ------------------------------------------------------------------------------
    def train_batch(self) -> Batch:
        if self.kind != "language_model":
            idx = next(self.samplers["train"])
            return self.splits["train"].x[idx], self.splits["train"].y[idx]
        x, y = self.splits["train"].x, self.splits["train"].y  # [S, n]
        if self.position + self.bptt > x.shape[0]:
            self.position, self.hidden = 0, None  # a new epoch starts from a zero state
        p = self.position
        self.position += self.bptt
        return x[p : p + self.bptt], y[p : p + self.bptt], self.hidden

    def val_batch(self) -> Batch:
        if self.kind != "language_model":
            idx = next(self.samplers["val"])
            return self.splits["val"].x[idx], self.splits["val"].y[idx]
        start = int(next(self.samplers["val"])[0]) * self.bptt
        x, y = self.splits["val"].x, self.splits["val"].y
        return x[start : start + self.bptt], y[start : start + self.bptt], None

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, params: dict[str, Tensor]) -> dict[str, float]:
        """Loss (and accuracy / unnormalised loss / perplexity) on every split, eval mode."""
        self.model.eval()
        out: dict[str, float] = {}
        for name, split in self.splits.items():
            loss, correct = self._eval_split(params, split)
            out[f"{name}/loss"] = loss
            if self.kind == "regression":
                scale = self.info.get("y_std", 1.0) ** 2 * self.info.get("test_loss_scale", 1.0)
                out[f"{name}/loss_unnormalised"] = loss * scale
            elif self.kind == "classification":
                out[f"{name}/accuracy"] = correct
                out[f"{name}/error"] = 1.0 - correct
            else:
                out[f"{name}/perplexity"] = math.exp(min(loss, 700.0))
        return out

    def _eval_split(self, params: dict[str, Tensor], split: Split) -> tuple[float, float]:
        total, correct, count, hidden = 0.0, 0.0, 0, None
        step = self.bptt if self.kind == "language_model" else self.eval_batch_size
        for s in range(0, split.x.shape[0], step):
            x, y = split.x[s : s + step], split.y[s : s + step]
            if self.kind == "language_model":
                (logits, hidden), _ = call(self.model, params, self.buffers, x, hidden)
                logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            else:
                logits, _ = call(self.model, params, self.buffers, x)
            total += float(self._criterion(logits, y)) * y.shape[0]
            if self.kind == "classification":
                correct += float((logits.argmax(-1) == y).sum())
            count += y.shape[0]
        return total / count, correct / count

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"buffers": dict(self.buffers), "position": self.position,
                "hidden": self.hidden, "samplers": {k: s.state_dict() for k, s in self.samplers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers, self.position = dict(state["buffers"]), int(state["position"])
        self.hidden = None if state["hidden"] is None else tuple(state["hidden"])
        for k, s in self.samplers.items():
            s.load_state_dict(state["samplers"][k])


def build_task(data: DataSection, model_cfg: ModelSection, *, train_on_val: bool, seed: int,
               device: torch.device) -> Task:
    """Load the data (``train_on_val``: train on train+validation, as Clarke et al.'s Random)
    and build the model; the parameters start from the global RNG (seeded by the run)."""
    ds = load_dataset(data.name, data.data_dir, split_seed=data.split_seed, val_size=data.val_size)
    if data.standardize:
        ds = standardized(ds)
    kind = ds.info.get("task", "classification")
    train = _concat(ds.train, ds.val) if train_on_val else ds.train
    model = _model(model_cfg, ds, kind).to(device)
    splits = {"train": train, "val": ds.val, "test": ds.test}
    if kind == "language_model":
        n = data.batch_size or 40
        splits = {k: Split(batchify(s.x, n), batchify(s.y, n)) for k, s in splits.items()}
    splits = {k: s.to(device) for k, s in splits.items()}
    task = Task(kind, model, splits, ds.info, data.batch_size or len(train), data.bptt,
                data.eval_batch_size, {k: b.detach().clone() for k, b in model.named_buffers()})
    if kind == "language_model":
        n_val = max(1, splits["val"].x.shape[0] // data.bptt)
        task.samplers["val"] = IndexSampler(n_val, 1, seed=seed + 1)
    else:
        task.samplers["train"] = IndexSampler(len(train), min(task.batch_size, len(train)), seed=seed)
        task.samplers["val"] = IndexSampler(len(ds.val), min(task.batch_size, len(ds.val)),
                                            seed=seed + 1)
    return task


def standardized(ds: Dataset) -> Dataset:
    """Every input feature (pixel) z-scored with the mean and unbiased std of train +
    validation, test with the same statistics; a constant feature (std 0) is only centred.

    Clarke et al. z-score Fashion-MNIST this way (``normalise_inputs``); raw [0, 1] pixels
    are uncentred and badly conditioned, and the learned lr then stays small (docs/results.md).
    """
    both = torch.cat([ds.train.x, ds.val.x]).double()  # float64: 60k-row sums stay exact
    mean, std = both.mean(0), both.std(0)
    std = torch.where(std == 0, torch.ones_like(std), std)

    def z(s: Split) -> Split:
        return Split(((s.x.double() - mean) / std).to(s.x.dtype), s.y)

    return Dataset(z(ds.train), z(ds.val), z(ds.test), ds.info)


def _concat(a: Split, b: Split) -> Split:
    return Split(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]))


def _model(cfg: ModelSection, ds: Dataset, kind: str) -> nn.Module:
    if cfg.name == "lstm":
        if kind != "language_model":
            raise ValueError(f"model.name 'lstm' needs a language-model data set, not {ds.info['name']!r}")
        return LSTMLanguageModel(ds.info["vocab_size"], embedding_dim=cfg.embedding_dim,
                                 hidden_size=cfg.hidden_size, num_layers=cfg.num_layers)
    if kind == "language_model":
        raise ValueError(f"data set {ds.info['name']!r} is a language model: set model.name: lstm")
    n_out = 1 if kind == "regression" else int(ds.info["num_classes"])
    if cfg.name == "resnet18":
        return resnet18(n_out, in_channels=int(ds.train.x.shape[1]))
    d_in = int(torch.tensor(ds.train.x.shape[1:]).prod())
    return MLP([d_in, *cfg.hidden, n_out], batch_norm=cfg.batch_norm)
