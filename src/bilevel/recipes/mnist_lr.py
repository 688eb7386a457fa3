"""mnist_lr: learn an MLP's learning rates on real MNIST while it trains (the demo).

One hyper-step every ``hypergrad.steps`` (T) SGD steps: the first T-1 steps use the current
learning rates as constants; the last one is differentiated with the one-pass implicit
hypergradient of Clarke et al. (``hypergrad.one_pass``, ``hypergrad.iters`` Neumann terms)
on a validation minibatch, and Adam moves ``log10 lr`` along it. ``hparam.granularity``
chooses one learning rate for the whole net (``scalar``), one per parameter tensor
(``tensor``), or one per weight (``element``, Clarke et al.'s HDLR).

Run it::

    bilevel data fetch mnist
    bilevel run mnist_lr/mlp.yaml --out runs/mnist_lr
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import field_validator
from torch.func import functional_call, grad

from bilevel import hypergrad
from bilevel.data import IndexSampler, load_dataset
from bilevel.models import MLP
from bilevel.optim import sgd
from bilevel.run import (
    CheckpointConfig,
    DataConfig,
    HParamConfig,
    HypergradConfig,
    InnerOptimConfig,
    LoggingConfig,
    ModelConfig,
    OuterOptimConfig,
    RunConfig,
    RunDir,
    Section,
    resolve_device,
)


class Config(Section):
    """Data, MLP, inner SGD, the learned log10 learning rates, and the outer Adam."""

    data: DataConfig = DataConfig(name="mnist", batch_size=100)
    model: ModelConfig = ModelConfig(name="mlp", hidden=[100])
    inner: InnerOptimConfig = InnerOptimConfig(name="sgd", lr=0.01)
    hparam: HParamConfig = HParamConfig(name="lr", granularity="tensor", low=-6.0, high=0.0)
    outer: OuterOptimConfig = OuterOptimConfig(name="adam", lr=0.05)
    hypergrad: HypergradConfig = HypergradConfig(method="one_pass", steps=10, iters=5)
    val_batch: int = 1000
    eval_every: int = 50
    run: RunConfig
    logging: LoggingConfig = LoggingConfig(every=10)
    checkpoint: CheckpointConfig = CheckpointConfig()

    @field_validator("hparam")
    @classmethod
    def _lr_only(cls, v: HParamConfig) -> HParamConfig:
        if (v.name, v.transform) != ("lr", "log10"):
            raise ValueError("mnist_lr learns learning rates in log10 space: set hparam.name: lr "
                             "and hparam.transform: log10")
        return v

    @field_validator("hypergrad")
    @classmethod
    def _one_pass(cls, v: HypergradConfig) -> HypergradConfig:
        if v.method != "one_pass":
            raise ValueError(f"mnist_lr uses hypergrad.method 'one_pass', got {v.method!r}")
        return v


def run(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train; return final test accuracy/loss and the learned learning rates."""
    device = resolve_device(config.run.device)
    ds = load_dataset(config.data.name, data_dir=config.data.data_dir,
                      split_seed=config.data.split_seed).to(device)
    in_dim = int(torch.tensor(ds.info["input_shape"]).prod())
    model = MLP([in_dim, *config.model.hidden, ds.info["num_classes"]], config.model.activation).to(device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt_state = sgd.init(params)

    # The learned quantity: log10 lr, one per net / per tensor / per weight.
    def lr_like(p: torch.Tensor) -> torch.Tensor:
        shape = () if config.hparam.granularity != "element" else p.shape
        return torch.full(shape, float(torch.log10(torch.tensor(config.inner.lr))), device=device)

    if config.hparam.granularity == "scalar":
        log_lr = {"all": lr_like(next(iter(params.values())))}
    else:
        log_lr = {k: lr_like(p) for k, p in params.items()}
    for v in log_lr.values():
        v.requires_grad_()
    outer = torch.optim.Adam(log_lr.values(), lr=config.outer.lr)
    train_batches = IndexSampler(len(ds.train.y), config.data.batch_size, seed=config.run.seed)
    val_batches = IndexSampler(len(ds.val.y), config.val_batch, seed=config.run.seed + 1)

    def nll(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, w, (x,)), y)

    def lrs(h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: 10 ** h["all" if "all" in h else k] for k in params}

    def sgd_step(w: dict[str, torch.Tensor], h: dict[str, torch.Tensor], t: int) -> Any:
        x, y = batch
        new_w, new_state = sgd.step(w, grad(nll)(w, x, y), opt_state, lr=lrs(h))
        return new_w, new_state  # (state, aux): the optimiser state is not differentiated

    def val_loss(w: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
        return nll(w, *val)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            logits = functional_call(model, params, (ds.test.x,))
            return {"test/loss": torch.nn.functional.cross_entropy(logits, ds.test.y).item(),
                    "test/acc": (logits.argmax(1) == ds.test.y).float().mean().item()}

    start = 0
    if (ckpt := run_dir.restore()) is not None:
        s = ckpt.state
        params, opt_state = s["params"], sgd.SGDState(*s["opt_state"])
        with torch.no_grad():
            for k, v in log_lr.items():
                v.copy_(s["log_lr"][k])
        outer.load_state_dict(s["outer"])
        train_batches.load_state_dict(s["train_batches"])
        val_batches.load_state_dict(s["val_batches"])
        start = ckpt.step

    for step in run_dir.steps(start, config.run.max_steps):
        const = {k: v.detach() for k, v in log_lr.items()}
        for i in range(config.hypergrad.steps):
            idx = next(train_batches)
            batch = (ds.train.x[idx], ds.train.y[idx])
            if i < config.hypergrad.steps - 1:  # ordinary steps, learning rates as constants
                params, opt_state = sgd_step(params, const, 0)
        val_idx = next(val_batches)
        val = (ds.val.x[val_idx], ds.val.y[val_idx])
        r = hypergrad.one_pass(sgd_step, val_loss, params, log_lr, terms=config.hypergrad.iters,
                               has_aux=True, on_divergence="identity")
        params, opt_state = r.state, r.aux
        outer.zero_grad(set_to_none=True)
        for k, v in log_lr.items():
            v.grad = r.hypergrad[k]
        outer.step()
        with torch.no_grad():
            for v in log_lr.values():
                v.clamp_(config.hparam.low, config.hparam.high)
        if step % config.logging.every == 0 or step == config.run.max_steps:
            metrics = {"train/loss": nll(params, *batch).item(), "val/loss": r.outer_loss.item()}
            metrics |= {f"hyper/lr/{k}": (10 ** v.detach()).mean().item() for k, v in log_lr.items()}
            if step % config.eval_every == 0 or step == config.run.max_steps:
                metrics |= evaluate()
            run_dir.log(step, metrics)
        run_dir.checkpoint(step, {
            "params": params, "opt_state": tuple(opt_state), "log_lr": {k: v.detach() for k, v in log_lr.items()},
            "outer": outer.state_dict(), "train_batches": train_batches.state_dict(),
            "val_batches": val_batches.state_dict(),
        }, force=step == config.run.max_steps)

    learned = {f"lr/{k}": (10 ** v.detach()).mean().item() for k, v in log_lr.items()}
    return {**evaluate(), **learned}
