"""mnist_schedule end to end through the CLI on scikit-learn's digits (offline): the schedule
learned by exact long-horizon hypergradients beats the constant schedule it started from
(so a sign error fails), and every arm is scored."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import run_cli

TINY = [
    "mnist_schedule/mlp.yaml", "--set", "data.name=digits", "--set", "data.batch_size=32",
    "--set", "model.hidden=[16]", "--set", "schedule.steps=150", "--set", "schedule.every=50",
    "--set", "schedule.lr=0.01", "--set", "schedule.momentum=0.5", "--set", "outer.lr=0.3",
    "--set", "baselines.grid=[0.05,0.2]", "--set", "val_size=300", "--set", "run.max_steps=6",
    "--set", "logging.tensorboard=false", "--set", "checkpoint.every=3",
]


def test_learned_schedule_beats_its_constant_start(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("run", *TINY, "--out", out)
    assert r.code == 0, r
    summary = json.loads((out / "summary.json").read_text())
    # the outer loss itself, and the held-out test loss, both improve on the start
    assert summary["val/loss/learned"] < 0.9 * summary["val/loss/start"]
    assert summary["test/loss/learned"] < summary["test/loss/start"]
    for arm in ("start", "learned", "step", "best_fixed", "fixed_0.05", "fixed_0.2"):
        assert 0.0 <= summary[f"test/acc/{arm}"] <= 1.0
    assert summary["best_fixed_lr"] in (0.05, 0.2)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m["val/loss"] for m in logged if "val/loss" in m]
    assert len(val) == 6 and val[-1] < val[0]
    schedule = json.loads((out / "schedule.json").read_text())
    assert len(schedule["learned"]["lr"]) == 3 and schedule["learned"]["lr"] != schedule["start"]["lr"]
    assert (out / "schedule.png").is_file()
