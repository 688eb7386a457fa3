"""The auxilearn recipe on scikit-learn's digits (offline): the linear combiner end to end
through the real CLI (run, resume), the other methods in-process through the same registry,
and the direction of learning: each learned combiner beats its frozen twin on the outer
objective, which a sign error in the meta-step fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bilevel.errors import ConfigError
from bilevel.recipes import _registry
from tests.cli.conftest import run_cli

TINY = """\
# bilevel run tiny.yaml
recipe: auxilearn
method: {method}
data: {{name: digits, batch_size: 16}}
tasks: {{labels_per_class: 6, auxiliary: [parity, rotation, noise], val_size: 100}}
model: {{name: mlp, hidden: [32]}}
inner: {{lr: 0.05, momentum: 0.9}}
meta: {{aux_per_class: 2, every: 2, batch_size: 16, lr: 0.05, hpo_lr: 0.05,
        combiner_hidden: [4]}}
eval_every: 10
run: {{seed: 1, max_steps: 30}}
logging: {{every: 5, tensorboard: false, progress: false}}
checkpoint: {{every: 10}}
"""




def tiny(tmp_path: Path, method: str) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(TINY.format(method=method))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("auxilearn")
    config, out = tiny(tmp, "linear"), tmp / "full"
    proc = run_cli("run", config, "--out", out)
    assert proc.code == 0, proc.err
    return config, out


def check_run(out: Path, method: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    evals = [r for r in records(out) if "val/acc" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    best = max(evals, key=lambda r: r["val/acc"])  # the first maximum: kept on improvement only
    assert (summary["val/acc"], summary["test/acc_at_best_val"], summary["best_step"]) == (
        best["val/acc"], best["test/acc"], best["step"])
    assert summary["val/acc"] > 0.5  # chance is 0.1; every method reaches 0.65-0.84 here
    logged = [r for r in records(out) if "weight/noise" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    noise = [r["weight/noise"] for r in logged]
    if method == "stl":
        assert noise == [0.0] * 6 and all(r["weight/main"] == 1.0 for r in logged)
    elif method == "equal":
        assert noise == [1.0] * 6
    else:  # learned and monotone: the projection keeps every weight non-negative
        assert all(r[k] >= 0 for r in logged for k in r if k.startswith("weight/"))
        metas = [r for r in records(out) if "meta/grad_norm" in r]
        assert len(metas) == 15 and all(r["meta/grad_norm"] > 0 for r in metas)


def test_linear_through_the_cli(linear_run: tuple[Path, Path]) -> None:
    check_run(linear_run[1], "linear")


@pytest.mark.parametrize("method", ["stl", "equal", "nonlinear"])
def test_other_methods(tmp_path: Path, method: str) -> None:
    _registry.start([tiny(tmp_path, method)], out=tmp_path / "run")
    check_run(tmp_path / "run", method)


@pytest.mark.parametrize("method", ["linear", "nonlinear"])
def test_learned_combiner_beats_its_frozen_twin(tmp_path: Path, method: str) -> None:
    """Both arms train the same primary net on the same batches; the twin's combiner is frozen
    (meta.lr 1e-9: the schema asks lr > 0, and SGD on a hypergradient clipped to norm 10
    moves it by < 1e-5 in 20 meta-steps). Every meta-step scores the whole auxiliary set
    (20 images < meta.batch_size), and at primary lr 0.01 the main task is still
    under-trained at step 40. Over the last 10 of the 20 meta-steps the learned combiner's
    main-task loss on the auxiliary set is on average 0.01 below the twin's: measured
    0.022-0.049 (linear) and 0.038-0.29 (nonlinear) over run.seed 0-7, while a combiner that
    ascends the hypergradient ends 0.013-0.12 above it. The linear one also wins on the
    validation images, which neither meta-step sees (+0.07 to +0.25 accuracy; ascending:
    -0.08 to -0.30)."""
    sets = ["inner.lr=0.01", "run.max_steps=40", "meta.batch_size=32", "eval_every=40",
            "checkpoint.every=40"]
    aux_loss, summary = {}, {}
    for arm, lr in (("learned", "0.05"), ("frozen", "1e-9")):
        _, summary[arm] = _registry.start([tiny(tmp_path, method)], [*sets, f"meta.lr={lr}"],
                                          out=tmp_path / arm)
        aux_loss[arm] = [r["meta/aux_loss"] for r in records(tmp_path / arm) if "meta/aux_loss" in r]
    assert len(aux_loss["learned"]) == 20 and aux_loss["learned"][0] == aux_loss["frozen"][0]
    gaps = [f - g for g, f in zip(aux_loss["learned"][10:], aux_loss["frozen"][10:], strict=True)]
    assert sum(gaps) / len(gaps) > 0.01, gaps
    if method == "linear":
        assert summary["learned"]["val/acc_final"] > summary["frozen"]["val/acc_final"]


def test_resume_is_exact(tmp_path: Path, linear_run: tuple[Path, Path]) -> None:
    """Stop at step 10 (a checkpoint), resume to 30: the same metrics as one 30-step run."""
    config, full = linear_run
    part = tmp_path / "part"
    proc = run_cli("run", config, "--out", part, "--set", "run.max_steps=10")
    assert proc.code == 0, proc.err
    proc = run_cli("resume", part, "--allow-config-change", "--set", "run.max_steps=30")
    assert proc.code == 0, proc.err

    def strip(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "wall"} for r in rs if "event" not in r]

    assert strip(records(part)) == strip(records(full))
    assert (json.loads((part / "summary.json").read_text())
            == json.loads((full / "summary.json").read_text()))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    config = tiny(tmp_path, "linear")
    with pytest.raises(ConfigError, match=r"meta.aux_per_class \(6\) must be below "
                                          r"tasks.labels_per_class \(6\)"):
        _registry.resolve([config], ["meta.aux_per_class=6"])
    with pytest.raises(ConfigError, match=r"tasks\.auxiliary"):
        _registry.resolve([config], ["tasks.auxiliary=[parity,colour]"])
