"""mnist_lr (`make demo-lr`) end to end through the CLI, on scikit-learn's digits offline:
it learns, it says what it learned, and a crash mid-checkpoint resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import assert_same_tree, cli_env, final_state, metrics_without_wall, run_cli

KILLED = -9
TINY = [
    "mnist_lr/mlp.yaml", "--set", "data.name=digits", "--set", "data.batch_size=32",
    "--set", "model.hidden=[32]", "--set", "val_batch=100", "--set", "inner.lr=0.03",
    "--set", "run.max_steps=12", "--set", "eval_every=6", "--set", "logging.every=3",
    "--set", "checkpoint.every=3", "--set", "logging.tensorboard=false",
]


def test_demo_recipe_learns_learning_rates(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("run", *TINY, "--out", out)
    assert r.code == 0, r
    summary = json.loads((out / "summary.json").read_text())
    summary = summary.get("summary", summary)
    assert summary["test/acc"] > 0.5  # 10 classes: chance is 0.1
    lrs = [v for k, v in summary.items() if k.startswith("lr/")]
    assert len(lrs) == 4  # one per parameter tensor of a one-hidden-layer MLP
    assert all(abs(v - 0.03) > 1e-4 for v in lrs)  # every one of them moved
    assert any(k.startswith("hyper/lr/") for k in metrics_without_wall(out)[-1])


def test_demo_recipe_resumes_bit_for_bit_after_a_crash_in_a_checkpoint_write(tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "crashed"
    assert run_cli("run", *TINY, "--out", ref).code == 0
    r = run_cli("run", *TINY, "--out", out, env=cli_env(BILEVEL_FAULT="checkpoint_write@3"))
    assert r.code == KILLED, r
    r = run_cli("resume", out)
    assert r.code == 0, r
    assert metrics_without_wall(out) == metrics_without_wall(ref)
    assert_same_tree(final_state(out)["state"], final_state(ref)["state"])
