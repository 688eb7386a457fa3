"""The ``alig`` recipe on the DNC repeat-copy task: it trains, its final objective is the
mean of the last losses, it resumes bit-identically after SIGKILL, gradient clipping and
the TF1-default baselines are wired, and the sweep/figure handle AliG's uncapped max_lr."""

from __future__ import annotations

import argparse
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from bilevel.cli import build_parser
from bilevel.errors import ConfigError
from bilevel.recipes import resolve, shipped_configs, start
from bilevel.recipes.alig.plots import SweepPoint, label_of, plot_sweep, sweep_table
from bilevel.recipes.alig.recipe import OptimConfig, build_optimizer
from tests.cli.conftest import run_cli
from tests.recipes.alig.test_alig import records, write

COPY = """\
recipe: alig
data: {name: repeat_copy, batch_size: 16}
model: {name: dnc}
optim: {name: adam, lr: 0.01, clip_grad_norm: 50.0}
eval: {every: 20}
run: {seed: 0, max_steps: 40, nan_policy: skip}
logging: {every: 1, tensorboard: false, progress: false}
checkpoint: {every: 10, keep_last: 2}
"""


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("copy")
    r = run_cli("run", write(root, COPY), "--out", root / "run")
    assert r.code == 0, r.err
    return root / "run"


def test_dnc_learns_and_reports_the_tail_mean(copy_run: Path) -> None:
    summary = json.loads((copy_run / "summary.json").read_text())
    losses = [x["train/batch_loss"] for x in records(copy_run) if "train/batch_loss" in x]
    assert len(losses) == 40
    assert summary["train/loss"] == pytest.approx(sum(losses) / 40)  # fewer than TAIL steps
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5  # Adam 1e-2 learns in 40 steps
    assert {"test/loss", "test/accuracy", "weights/norm"} <= summary.keys()
    assert 0 <= summary["test/accuracy"] <= 1


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, copy_run: Path) -> None:
    r = run_cli("run", write(tmp_path, COPY), "--out", tmp_path / "cut", fault="inner@23")
    assert r.code == -signal.SIGKILL, r.err
    r = run_cli("resume", tmp_path / "cut")
    assert r.code == 0, r.err
    assert records(copy_run) == records(tmp_path / "cut")


def test_alig_on_the_dnc_uses_the_polyak_step(tmp_path: Path) -> None:
    text = COPY.replace("{name: adam, lr: 0.01, clip_grad_norm: 50.0}",
                        "{name: alig, max_lr: null, momentum: 0.0, eps: 0.0}")
    start([write(tmp_path, text)], ["run.max_steps=5"], out=tmp_path / "alig")  # in process
    steps = [x for x in records(tmp_path / "alig") if "alig/step_size" in x]
    assert len(steps) == 5 and all(x["alig/clipped"] == 0 for x in steps)
    assert all(x["alig/step_size"] == x["alig/step_size_unclipped"] > 0 for x in steps)


def test_gradient_clipping_bounds_the_first_step(tmp_path: Path) -> None:
    """SGD lr 1 with the norm clipped to 1e-3 moves the weights by at most 1e-3."""
    torch.manual_seed(0)
    text = COPY.replace("{name: adam, lr: 0.01, clip_grad_norm: 50.0}",
                        "{name: sgd, lr: 1.0, momentum: 0.0, clip_grad_norm: 1.0e-3}")
    start([write(tmp_path, text)], ["run.max_steps=1", "checkpoint.every=1"],
          out=tmp_path / "clip")
    ckpt = sorted((tmp_path / "clip" / "checkpoints").glob("step-*.pt"))[-1]
    after = torch.load(ckpt, weights_only=True)["state"]["model"]
    torch.manual_seed(0)  # the recipe seeds the global RNG with run.seed before building
    from bilevel.models import DNC

    before = DNC(6, 5).state_dict()
    moved = torch.cat([(after[k] - before[k]).reshape(-1) for k in before]).norm()
    assert 0 < float(moved) <= 1e-3 * 1.001


def test_tf1_defaults_of_the_baselines() -> None:
    model = torch.nn.Linear(2, 1)
    ada = build_optimizer(OptimConfig(name="adagrad", lr=0.5), model)
    assert isinstance(ada, torch.optim.Adagrad)
    assert ada.param_groups[0]["initial_accumulator_value"] == 0.1
    rms = build_optimizer(OptimConfig(name="rmsprop"), model)
    assert isinstance(rms, torch.optim.RMSprop)
    assert (rms.param_groups[0]["alpha"], rms.param_groups[0]["eps"]) == (0.9, 1e-10)
    with pytest.raises(ValueError, match=r"optim\.momentum does not apply"):
        OptimConfig(name="adagrad", momentum=0.9)


def test_task_and_model_must_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.name: dnc goes with data\.name: repeat_copy"):
        resolve([write(tmp_path, COPY)], ["model.name=mlp"])
    with pytest.raises(ConfigError, match=r"model\.name: dnc goes with"):
        resolve([write(tmp_path, COPY)], ["data.name=digits"])


def test_shipped_dnc_configs_follow_the_authors_protocol() -> None:
    shipped = {p.stem: resolve([p])[1] for p in shipped_configs()
               if p.parent.name == "alig" and p.stem.startswith("dnc_copy_")}
    assert set(shipped) == {f"dnc_copy_{o}" for o in
                            ("alig", "sgd", "nag", "adam", "adagrad", "rmsprop")}
    for name, cfg in shipped.items():
        assert (cfg.data.name, cfg.data.batch_size, cfg.model.name) == ("repeat_copy", 16, "dnc")
        if name == "dnc_copy_alig":  # eps 0, no clipping, no momentum
            assert (cfg.optim.eps, cfg.optim.clip_grad_norm, cfg.optim.momentum) == (0, None, 0)
        else:
            assert cfg.optim.clip_grad_norm == 50.0
    assert shipped["dnc_copy_nag"].optim.nesterov and shipped["dnc_copy_nag"].optim.momentum == 0.9
    assert shipped["dnc_copy_sgd"].optim.momentum == 0


def test_sweep_values_accept_none_for_alig_only(tmp_path: Path) -> None:
    from bilevel.recipes.alig.cli import _floats

    assert _floats("1e2,none,1e7") == [100.0, None, 1e7]
    with pytest.raises(argparse.ArgumentTypeError):
        _floats("0,1")
    alig = write(tmp_path, COPY.replace("{name: adam, lr: 0.01, clip_grad_norm: 50.0}",
                                        "{name: alig, max_lr: 1.0}"), "alig.yaml")
    sgd = write(tmp_path, COPY.replace("name: adam", "name: sgd"), "sgd.yaml")
    # Every config is checked before anything runs: the AliG runs listed first do not start.
    with pytest.raises(ConfigError, match="numeric lr"):
        main(["alig", "sweep", str(alig), str(sgd), "--values", "1,none",
              "--out", str(tmp_path / "sweep")])
    assert not (tmp_path / "sweep").exists()


def main(argv: list[str]) -> int:
    """The CLI in process, letting library errors propagate."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


def _point(label: str, knob: float | None, loss: float, acc: float) -> SweepPoint:
    return SweepPoint(label, knob, 0, loss, math.nan, acc, not math.isfinite(loss))


def test_figure_and_table_place_the_uncapped_run(tmp_path: Path) -> None:
    points = [_point("AliG (μ=0)", 1e2, 0.5, 0.9), _point("AliG (μ=0)", None, 0.4, 0.95),
              _point("SGD (clip 50)", 1e-2, 7.0, 0.0), _point("SGD (clip 50)", 10, math.nan, 0)]
    table = sweep_table(points)
    assert "val accuracy" not in table  # repeat copy has no validation split
    assert "| AliG (μ=0) | none | 1 | 0.4 | 0.9500 | 0/1 |" in table
    assert "| SGD (clip 50) | 10 | 1 | nan | 0.0000 | 1/1 |" in table
    png = plot_sweep(points, tmp_path / "fig.png", loss_cap=1000.0)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_labels_name_each_baseline() -> None:
    assert label_of({"name": "sgd", "momentum": 0.0, "clip_grad_norm": 50.0}) == "SGD (clip 50)"
    standard = {"name": "alig", "momentum": 0.9, "max_norm": 20.0, "adjusted_momentum": False}
    assert label_of(standard) == "AliG (μ=0.9, ‖w‖ ≤ 20)"
    assert label_of({**standard, "adjusted_momentum": True}) == "AliG (μ=0.9, adjusted, ‖w‖ ≤ 20)"
    assert label_of({"name": "sgd", "momentum": 0.9, "nesterov": True,
                     "clip_grad_norm": 50.0}) == "NAG (μ=0.9, clip 50)"
    assert label_of({"name": "rmsprop", "clip_grad_norm": 50.0}) == "RMSprop (clip 50)"
    assert label_of({"name": "adam"}) == "Adam"
    assert label_of({"name": "alig", "momentum": 0.0, "max_lr": None}) == "AliG (μ=0)"
