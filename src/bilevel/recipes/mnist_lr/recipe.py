"""mnist_lr: learn an MLP's learning rates on real MNIST while it trains (the demo).

The optimiser is :class:`bilevel.hypergrad.HyperSGD`: one hyper-step every ``hypergrad.steps``
(T) SGD steps, the last of which is differentiated with the one-pass implicit hypergradient of
Clarke et al. (``hypergrad.terms`` Neumann terms in total) on a validation minibatch; the
hyper-optimiser (``outer``, Adam by default) moves ``log10 lr`` along it, clipped to
``[hparam.low, hparam.high]``. ``hparam.granularity``
chooses one learning rate for the whole net (``scalar``), one per parameter tensor
(``tensor``), or one per weight (``element``, Clarke et al.'s HDLR).

Run it::

    bilevel data fetch mnist
    bilevel run mnist_lr/mlp.yaml --out runs/mnist_lr
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from bilevel.data import IndexSampler, load_dataset
from bilevel.hypergrad import HyperSGD
from bilevel.models import MLP
from bilevel.run import (
    AbortRunConfig,
    CheckpointConfig,
    DataConfig,
    HParamConfig,
    LoggingConfig,
    MLPConfig,
    OnePass,
    OuterOptimConfig,
    RunDir,
    RunState,
    Section,
    SGDConfig,
    resolve_device,
)


class Config(Section):
    """Data, MLP, inner SGD, the learned log10 learning rates, and the outer Adam."""

    data: DataConfig = DataConfig(name="mnist", batch_size=100)
    model: MLPConfig = MLPConfig(hidden=[100])
    inner: SGDConfig = SGDConfig()  # HyperSGD's rule; inner.lr is the learned rates' start
    hparam: HParamConfig = HParamConfig(name="lr", granularity="tensor", low=-6.0, high=0.0)
    outer: OuterOptimConfig = OuterOptimConfig(name="adam", lr=0.05)
    hypergrad: OnePass = OnePass(steps=10, terms=5)
    val_batch: int = Field(1000, gt=0, le=2**20)
    eval_every: int = Field(50, gt=0)
    run: AbortRunConfig  # HyperSGD raises on a non-finite hypergradient: exit 1
    logging: LoggingConfig = LoggingConfig(every=10)
    checkpoint: CheckpointConfig = CheckpointConfig()

    @field_validator("hparam")
    @classmethod
    def _lr_only(cls, v: HParamConfig) -> HParamConfig:
        if (v.name, v.transform) != ("lr", "log10"):
            raise ValueError("mnist_lr learns learning rates in log10 space: set hparam.name: lr "
                             "and hparam.transform: log10")
        return v


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train; return final test accuracy/loss and the learned learning rates."""
    device = resolve_device(config.run.device)
    ds = load_dataset(config.data.name, data_dir=config.data.data_dir,
                      split_seed=config.data.split_seed).to(device)
    in_dim = int(torch.tensor(ds.info["input_shape"]).prod())
    model = MLP([in_dim, *config.model.hidden, ds.info["num_classes"]], config.model.activation).to(device)
    h = config.hparam
    opt = HyperSGD(model.named_parameters(), lr=config.inner.lr, momentum=config.inner.momentum,
                   weight_decay=config.inner.weight_decay, learn=("lr",), grad_clip=config.outer.grad_clip,
                   granularity=h.granularity, terms=config.hypergrad.terms,
                   hyper_every=config.hypergrad.steps, hyper_optimizer=config.outer.name,
                   hyper_lr=config.outer.lr, on_nonfinite="raise", on_divergence="identity",
                   lr_bounds=(None if h.low is None else 10.0 ** h.low,
                              None if h.high is None else 10.0 ** h.high))
    train_batches = IndexSampler(len(ds.train.y), config.data.batch_size, seed=config.run.seed)
    val_batches = IndexSampler(len(ds.val.y), config.val_batch, seed=config.run.seed + 1)

    def nll(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x), y)

    def val_loss() -> torch.Tensor:  # drawn only when a hyper-step is due
        idx = next(val_batches)
        return nll(ds.val.x[idx], ds.val.y[idx])

    def learned_lrs() -> dict[str, float]:
        lr = opt.values()["lr"]
        lrs = lr if isinstance(lr, dict) else {"all": lr}
        return {k: v.mean().item() for k, v in lrs.items()}

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            logits = model(ds.test.x)
            return {"test/loss": torch.nn.functional.cross_entropy(logits, ds.test.y).item(),
                    "test/acc": (logits.argmax(1) == ds.test.y).float().mean().item()}

    state = RunState(params=dict(model.named_parameters()), opt=opt,
                     train_batches=train_batches, val_batches=val_batches)
    start = run_dir.resume(state)

    for step in run_dir.steps(start, config.run.max_steps):
        for _ in range(config.hypergrad.steps):  # the last step's update is differentiated
            idx = next(train_batches)
            batch = (ds.train.x[idx], ds.train.y[idx])
            opt.step(lambda b=batch: nll(*b))
        val = opt.hyper_step(val_loss)
        if step % config.logging.every == 0 or step == config.run.max_steps:
            with torch.no_grad():
                metrics = {"train/loss": nll(*batch).item(), "val/loss": float(val)}
            metrics |= {f"hyper/lr/{k}": v for k, v in learned_lrs().items()}
            if step % config.eval_every == 0 or step == config.run.max_steps:
                metrics |= evaluate()
            run_dir.log(step, metrics)
        run_dir.checkpoint(step, state, force=step == config.run.max_steps)

    return {**evaluate(), **{f"lr/{k}": v for k, v in learned_lrs().items()}}
