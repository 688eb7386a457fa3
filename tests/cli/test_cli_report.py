"""``bilevel report`` over two tiny runs, and the non-finite policy end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.cli.conftest import cli_env, final_state, run_cli


def test_report_of_two_runs(tmp_path: Path, tiny: Path) -> None:
    for seed in (1, 2):
        r = run_cli("run", tiny, "--out", tmp_path / "runs" / f"s{seed}", "--seed", str(seed),
                    "--set", "run.max_steps=12")
        assert r.code == 0, r
    r = run_cli("report", str(tmp_path / "runs" / "*"), "--out", tmp_path / "rep")
    assert r.code == 0, r
    for name in ("curves.png", "hyperparameters.png"):
        data = (tmp_path / "rep" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "| val/loss | 2 |" in md and "±" in md
    rows = list(csv.DictReader((tmp_path / "rep" / "summary.csv").read_text().splitlines()))
    val = next(row for row in rows if row["metric"] == "val/loss")
    finals = [json.loads((tmp_path / "runs" / s / "summary.json").read_text())["val/loss"]
              for s in ("s1", "s2")]
    assert int(val["runs"]) == 2 and float(val["best"]) == min(finals)


@pytest.mark.parametrize("policy", ["skip", "rollback", "abort"])
def test_nan_policy(tmp_path: Path, tiny: Path, policy: str) -> None:
    out = tmp_path / "run"
    r = run_cli("run", tiny, "--out", out, "--set", f"run.nan_policy={policy}",
                "--set", "run.max_steps=12", env=cli_env(BILEVEL_FAULT="nan_hypergrad@8"))
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = [e for e in events if "event" in e]
    if policy == "rollback":  # back to the step-5 checkpoint; the event says why
        assert events[0]["event"] == "rollback" and events[0]["step"] == 5
        assert events[0]["nonfinite_step"] == 8
    else:
        assert events[0]["event"] == "nonfinite" and events[0]["step"] == 8
    if policy == "abort":
        assert r.code == 1 and "non-finite hypergradient at step 8" in r.err, r
        return
    assert r.code == 0, r
    state = final_state(out)["state"]
    assert all(v.isfinite().all() for v in state["params"].values())
    assert state["log_lr"].isfinite()
    if policy == "rollback":
        assert state["rollbacks"] == 1 and state["lr_scale"] == 0.5
