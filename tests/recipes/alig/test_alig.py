"""The ``alig`` recipe and ``bilevel alig sweep`` through the real CLI, on scikit-learn's
digits (offline, 1,200 training rows) with tiny settings."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel.errors import ConfigError
from bilevel.recipes import resolve, shipped_configs
from bilevel.recipes.alig.recipe import OptimConfig, build_model, scheduled_lr
from bilevel.run import ModelConfig
from tests.cli.conftest import run_cli

TINY = """\
# bilevel run tiny.yaml
recipe: alig
data: {name: digits, batch_size: 32}
model: {name: mlp, hidden: [32]}
optim: {name: alig, max_lr: 1.0, momentum: 0.9}
eval: {every: 20}
run: {seed: 0, max_steps: 60, nan_policy: skip}
logging: {every: 5, tensorboard: false, progress: false}
checkpoint: {every: 10, keep_last: 2}
"""
SGD = TINY.replace("{name: alig, max_lr: 1.0, momentum: 0.9}",
                   "{name: sgd, lr: 0.1, momentum: 0.9, decay_at: [0.5, 0.75]}")




def records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall"} for line in lines]


def write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted AliG run of TINY, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("tiny")
    r = run_cli("run", write(root, TINY), "--out", root / "run")
    assert r.code == 0, r.err
    return root / "run"


def test_alig_trains_and_logs_its_step_sizes(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    logs = records(tiny_run)
    first_eval = next(x for x in logs if "train/loss" in x)
    assert summary["train/loss"] < 0.8 * first_eval["train/loss"]
    assert summary["test/accuracy"] > 0.5  # chance is 0.1
    steps = [x for x in logs if "alig/step_size" in x]
    assert [x["step"] for x in steps] == list(range(5, 61, 5))
    for x in steps:  # γ = min(γ_u, max_lr), and the clipped fraction is a fraction
        assert x["alig/step_size"] == pytest.approx(min(x["alig/step_size_unclipped"], 1.0))
        assert 0 <= x["alig/clipped"] <= 1 and x["optim/lr"] == 1.0
    assert any(x["alig/clipped"] < 1 for x in steps)  # the Polyak step is active somewhere


def test_best_validation_weights_are_reloaded_for_testing(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    evals = {x["step"]: x for x in records(tiny_run) if "val/accuracy" in x}
    assert sorted(evals) == [20, 40, 60]
    best = max(evals, key=lambda s: (evals[s]["val/accuracy"], -s))  # earliest on ties
    assert summary["best/step"] == best
    assert summary["best/val_accuracy"] == evals[best]["val/accuracy"]
    assert summary["best/test_accuracy"] == pytest.approx(evals[best]["test/accuracy"])
    assert summary["best/test_loss"] == pytest.approx(evals[best]["test/loss"])
    assert summary["test/accuracy"] == evals[60]["test/accuracy"]  # the final weights


def test_best_weights_reload_restores_the_final_ones() -> None:
    """The reload branch: an earlier evaluation won, so its weights are tested and the
    model is given back its final weights."""
    from bilevel.data import load_dataset
    from bilevel.recipes.alig.recipe import _best_model_metrics, _keep_best, evaluate

    ds = load_dataset("digits", split_seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = ds.train.x.flatten(1), torch.nn.functional.one_hot(ds.train.y, 10).float()
    with torch.no_grad():  # early weights: a least-squares fit (accurate)
        model[1].weight.copy_((torch.linalg.pinv(x) @ y).T)
        model[1].bias.zero_()
    best: dict[str, Any] = {"step": 0, "val": -1.0, "model": None}
    early = evaluate(model, ds, None)
    _keep_best(best, 20, early, model)
    with torch.no_grad():  # final weights: always class 0 (chance)
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(10.0, 0.0, -1.0))
    final_weights = model[1].weight.detach().clone()
    final = evaluate(model, ds, None)
    got = _best_model_metrics(best, 60, final, model, ds, None)
    assert got["best/step"] == 20 and got["best/test_accuracy"] == early["test/accuracy"]
    assert got["best/test_accuracy"] > 0.5 > final["test/accuracy"]
    assert torch.equal(model[1].weight, final_weights)


def test_sgd_follows_its_step_schedule(tmp_path: Path) -> None:
    r = run_cli("run", write(tmp_path, SGD), "--out", tmp_path / "run")
    assert r.code == 0, r.err
    lr = {x["step"]: x["optim/lr"] for x in records(tmp_path / "run") if "optim/lr" in x}
    assert lr[30] == pytest.approx(0.1) and lr[35] == pytest.approx(0.01)
    assert lr[45] == pytest.approx(0.01) and lr[50] == pytest.approx(0.001)
    assert not any("alig/step_size" in x for x in records(tmp_path / "run"))


def test_scheduled_lr_counts_the_passed_fractions() -> None:
    cfg = OptimConfig(name="sgd", lr=0.5, decay_at=[0.5, 0.75], decay_factor=0.2)
    assert [scheduled_lr(cfg, t, 100) for t in (1, 50, 51, 75, 76, 100)] == pytest.approx(
        [0.5, 0.5, 0.1, 0.1, 0.02, 0.02])


def test_l2_ball_projection_bounds_the_weight_norm(tmp_path: Path, tiny_run: Path) -> None:
    text = TINY.replace("momentum: 0.9}", "momentum: 0.9, max_norm: 8.0}")
    ball = run_cli("run", write(tmp_path, text, "ball.yaml"), "--out", tmp_path / "ball")
    assert ball.code == 0, ball.err
    free = json.loads((tiny_run / "summary.json").read_text())
    assert free["weights/norm"] > 8.0  # the bound is active
    norms = [x["weights/norm"] for x in records(tmp_path / "ball") if "weights/norm" in x]
    assert len(norms) == 3 and max(norms) <= 8.0 + 1e-4


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, tiny_run: Path) -> None:
    r = run_cli("run", write(tmp_path, TINY), "--out", tmp_path / "cut", fault="inner@37")
    assert r.code == -signal.SIGKILL, r.err
    r = run_cli("resume", tmp_path / "cut")
    assert r.code == 0, r.err
    assert records(tiny_run) == records(tmp_path / "cut")
    whole, cut = (torch.load(sorted((d / "checkpoints").glob("step-*.pt"))[-1],
                             weights_only=True)["state"] for d in (tiny_run, tmp_path / "cut"))
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], cut["model"][k])
    assert torch.equal(whole["window"], cut["window"])


def test_divergence_stops_or_aborts_by_nan_policy(tmp_path: Path) -> None:
    text = SGD.replace("lr: 0.1,", "lr: 1e30,")
    r = run_cli("run", write(tmp_path, text), "--out", tmp_path / "skip")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert 1 <= summary["train/diverged_step"] < 60
    assert any(x.get("event") == "diverged" for x in records(tmp_path / "skip"))
    r = run_cli("run", write(tmp_path, text.replace("nan_policy: skip", "nan_policy: abort")),
            "--out", tmp_path / "abort")
    assert r.code == 1 and "non-finite training loss" in r.err, r.err


def test_sweep_runs_the_grid_skips_finished_runs_and_plots(tmp_path: Path) -> None:
    alig, sgd = write(tmp_path, TINY, "alig.yaml"), write(tmp_path, SGD, "sgd.yaml")
    args = ("alig", "sweep", alig, sgd, "--values", "0.01,1,1e30", "--set", "run.max_steps=20",
            "--set", "eval.every=100", "--out", tmp_path / "sweep")
    r = run_cli(*args)
    assert r.code == 0, r.err
    runs = sorted(p.parent.relative_to(tmp_path / "sweep")
                  for p in (tmp_path / "sweep").rglob("run.json"))
    assert [str(p) for p in runs] == [f"{c}/{k}={v}/seed-0" for c, k in
                                      (("alig", "max_lr"), ("sgd", "lr"))
                                      for v in ("0.01", "1", "1e+30")]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[-2].strip()
            for line in (tmp_path / "sweep" / "sweep.md").read_text().splitlines()[2:]}
    assert len(rows) == 6  # diverged count per (optimiser, knob): only SGD at lr 1e6
    assert rows[("AliG (μ=0.9)", "1e+30")] == "0/1"
    assert rows[("SGD (μ=0.9 + step schedule)", "1e+30")] == "1/1"
    assert rows[("SGD (μ=0.9 + step schedule)", "0.01")] == "0/1"
    png = (tmp_path / "sweep" / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 300_000
    curves = tmp_path / "curves.png"
    r = run_cli("alig", "curves", tmp_path / "sweep" / "alig" / "max_lr=1",
            tmp_path / "sweep" / "sgd" / "lr=0.01", "--out", curves)
    assert r.code == 0 and curves.read_bytes().startswith(b"\x89PNG"), r.err
    stamp = (tmp_path / "sweep" / "alig" / "max_lr=1" / "seed-0" / "summary.json").stat()
    r = run_cli(*args)  # again: every run is finished, nothing is rerun
    assert r.code == 0 and "done" not in r.out, r.out
    assert (tmp_path / "sweep" / "alig" / "max_lr=1" / "seed-0" / "summary.json"
            ).stat().st_mtime_ns == stamp.st_mtime_ns
    r = run_cli(*[a if a != "run.max_steps=20" else "run.max_steps=21" for a in args])
    assert r.code == 2 and "holds a run of a different config" in r.err, r.err
    assert "run.max_steps: 20 -> 21" in r.err


ERRORS = {
    "optim.lr=0.1": ("optim.lr does not apply to optim.name='alig'", "optim.max_lr"),
    "optim.weight_decay=1e-4": ("optim.weight_decay does not apply", "sgd/adam"),
    "optim.nesterov=true": ("optim.nesterov does not apply", "sgd"),
    "run.nan_policy=rollback": ("run.nan_policy = 'rollback'", "'skip' or 'abort'"),
    "data.name=uci_energy": ("trains classifiers", "mnist"),
    "model.dropout=0.5": ("model.dropout", "set it to 0"),
}


@pytest.mark.parametrize("override", sorted(ERRORS))
def test_bad_keys_are_named_with_the_fix(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve([write(tmp_path, TINY)], [override])
    for part in ERRORS[override]:
        assert part in str(err.value)


def test_bad_config_exits_2_and_cnn_needs_images(tmp_path: Path) -> None:
    bad = write(tmp_path, TINY.replace("max_lr: 1.0", "lr: 1.0"), "bad.yaml")
    r = run_cli("config", "validate", bad)
    assert r.code == 2 and "optim.max_lr" in r.err and f"{bad}:5" in r.err, r.err
    info = {"name": "mnist1d", "input_shape": (40,), "num_classes": 10}
    with pytest.raises(ConfigError, match=r"cnn needs 28x28 or 32x32 images.*model\.name: mlp"):
        build_model(ModelConfig(name="cnn"), info)
    assert build_model(ModelConfig(name="cnn"), {**info, "input_shape": (1, 28, 28)})


def test_shipped_configs_cover_three_optimisers_on_three_problems() -> None:
    shipped = {p.stem: resolve([p])[1] for p in shipped_configs() if p.parent.name == "alig"}
    for problem in ("mnist_mlp", "mnist_cnn", "mnist1d_mlp"):
        assert {shipped[f"{problem}_{o}"].optim.name for o in ("alig", "sgd", "adam")} == \
            {"alig", "sgd", "adam"}
    assert shipped["mnist_mlp_alig_ball"].optim.max_norm is not None
    for name, cfg in shipped.items():  # weight decay only in the paper's SGD baseline
        assert not cfg.optim.weight_decay or name == "mnist_cnn_sgd_wd"
        assert cfg.optim.name != "sgd" or cfg.optim.decay_at or name.startswith("dnc_copy_")
    # The paper's image recipe: momentum 0.9 + L2 ball, both momentum forms, 10 epochs.
    standard, adjusted = shipped["mnist_cnn_alig_ball"], shipped["mnist_cnn_alig_ball_adjusted"]
    for cfg in (standard, adjusted, shipped["mnist_cnn_sgd_wd"]):
        assert cfg.model.name == "cnn" and cfg.run.max_steps == 10 * 390
    assert standard.optim.momentum == adjusted.optim.momentum == 0.9
    assert standard.optim.max_norm == adjusted.optim.max_norm is not None
    assert (standard.optim.adjusted_momentum, adjusted.optim.adjusted_momentum) == (False, True)
    assert shipped["mnist_cnn_sgd_wd"].optim.weight_decay > 0
