"""The mnist_lr and onepass (``ours``) recipes are HyperSGD: a user's own loop with the
drop-in, on the same seed and data (scikit-learn digits, offline), reproduces each recipe's
numbers bit for bit. (That HyperSGD itself equals the engine's one-pass loop is
tests/hypergrad/test_hypersgd.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import bilevel
from bilevel.data import IndexSampler, load_dataset
from bilevel.models import MLP
from bilevel.recipes import start
from bilevel.run import seed_everything
from tests.cli.conftest import final_state

SEED = 3


def _train(model, opt, ds, train: IndexSampler, val: IndexSampler, n: int) -> None:
    """The user's loop: HyperSGD steps on training batches, a validation closure each step."""
    def val_loss() -> torch.Tensor:
        idx = next(val)  # drawn only when HyperSGD calls it: on hyper-steps
        return F.cross_entropy(model(ds.val.x[idx]), ds.val.y[idx])

    for _ in range(n):
        idx = next(train)
        opt.step(lambda idx=idx: F.cross_entropy(model(ds.train.x[idx]), ds.train.y[idx]))
        opt.hyper_step(val_loss)


def test_mnist_lr_recipe_is_a_hypersgd_loop(tmp_path: Path) -> None:
    steps, T = 4, 5
    _, summary = start(["mnist_lr/mlp.yaml"], [
        "data.name=digits", "data.batch_size=32", "model.hidden=[32]", "val_batch=100",
        "inner.lr=0.03", f"run.max_steps={steps}", f"hypergrad.steps={T}", "hypergrad.terms=3",
        "logging.tensorboard=false", "logging.progress=false", "hparam.granularity=element",
    ], out=tmp_path / "run", seed=SEED)

    seed_everything(SEED)  # what `bilevel run` does before the recipe builds its model
    ds = load_dataset("digits")
    model = MLP([64, 32, 10])
    opt = bilevel.HyperSGD(model.named_parameters(), lr=0.03, granularity="element", terms=3,
                           hyper_every=T, hyper_lr=0.05, lr_bounds=(1e-6, 1.0))
    train = IndexSampler(len(ds.train.y), 32, seed=SEED)
    val = IndexSampler(len(ds.val.y), 100, seed=SEED + 1)
    _train(model, opt, ds, train, val, steps * T)
    with torch.no_grad():
        logits = model(ds.test.x)
    assert summary["test/loss"] == F.cross_entropy(logits, ds.test.y).item()
    assert summary["test/acc"] == (logits.argmax(1) == ds.test.y).float().mean().item()
    lrs = opt.values()["lr"]
    assert {k: v for k, v in summary.items() if k.startswith("lr/")} == {
        f"lr/{k}": v.mean().item() for k, v in lrs.items()}


def test_onepass_ours_recipe_is_a_hypersgd_loop(tmp_path: Path) -> None:
    T, hyper_steps = 5, 4
    out = tmp_path / "run"
    start(["onepass/ours_wd_hdlr_m.yaml"], [
        "data.name=digits", "data.batch_size=64", "inner.lr=0.05", "inner.grad_clip=5.0",
        f"algorithm.weight_steps={T}", "algorithm.terms=3", f"run.max_steps={T * hyper_steps}",
        "logging.progress=false", "checkpoint.every=1000",
    ], out=out, seed=SEED)

    seed_everything(SEED)
    ds = load_dataset("digits", split_seed=None)  # onepass's default: the last rows validate
    model = MLP([64, 50, 10])
    opt = bilevel.HyperSGD(model.named_parameters(), lr=0.05, weight_decay=1e-5, momentum=0.5,
                           learn=("lr", "weight_decay", "momentum"), granularity={"lr": "element"},
                           terms=3, hyper_every=T, grad_clip=5.0)
    train = IndexSampler(len(ds.train.y), 64, seed=SEED)
    val = IndexSampler(len(ds.val.y), 64, seed=SEED + 1)
    _train(model, opt, ds, train, val, T * hyper_steps)

    state = final_state(out)["state"]
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), state["w"][k]), k
    summary = json.loads((out / "summary.json").read_text())
    for name, value in opt.hyperparameters().items():
        assert summary[f"hyper/{name}"] == value, name
