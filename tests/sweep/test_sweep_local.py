"""bilevel sweep: search-space draws, shared initialisations, crash resume, the paper's table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.cli import main
from bilevel.errors import ConfigError
from bilevel.recipes.onepass.table import markdown, table, three_batched
from bilevel.report.collect import RunRecord
from bilevel.report.stats import bootstrap_summary
from bilevel.sweep import check_space, make_plan, sample
from bilevel.sweep.plan import Plan
from tests.conftest import shared_data_dir

SPACE = {"inner.lr": {"dist": "log10_uniform", "low": -6.0, "high": -1.0},
         "inner.momentum": {"dist": "uniform", "low": 0.0, "high": 1.0}}


def test_draws_are_in_range_reproducible_and_stable_under_extension() -> None:
    draws = [sample(SPACE, i, seed=3) for i in range(200)]
    assert all(1e-6 <= d["inner.lr"] <= 0.1 and 0 <= d["inner.momentum"] <= 1 for d in draws)
    assert draws[5] == sample(SPACE, 5, seed=3) and draws[5] != sample(SPACE, 5, seed=4)
    logs = sorted(math.log10(d["inner.lr"]) for d in draws)
    assert logs[0] < -5.5 and logs[-1] > -1.5  # log-uniform, not uniform


def test_bad_space_lists_every_problem() -> None:
    with pytest.raises(ConfigError, match=r"(?s)a: dist must.*b: low \(2\) must not exceed"):
        check_space({"a": {"dist": "gauss"}, "b": {"dist": "uniform", "low": 2, "high": 1}})


def test_shared_initialisations_are_identical_across_algorithms(tmp_path: Path) -> None:
    plan = make_plan(["onepass/uci_energy.yaml"], ["onepass/random.yaml", "onepass/ours_wd_lr_m.yaml",
                                                  "onepass/lorraine.yaml"], inits=4, seed=7)
    trials = plan.trials(tmp_path)
    assert len(trials) == 12
    for i in range(4):
        same = [t for t in trials if t.index == i]
        assert {t.variant for t in same} == {"random", "ours_wd_lr_m", "lorraine"}
        assert len({tuple(t.overrides) for t in same}) == 1  # identical draws and run.seed
        assert f"run.seed={7 + i}" in same[0].overrides
    bigger = Plan(plan.base, plan.variants, plan.space, 6, plan.seed, plan.overrides)
    assert bigger.trials(tmp_path)[:12] == trials and not bigger.compatible(plan)


def test_bootstrap_matches_hand_computation() -> None:
    # Two runs {1, 3}: a resample of two has mean 1, 2 or 3 with probability 1/4, 1/2, 1/4,
    # so the bootstrap mean is 2 with std sqrt(1/2); the median of two values is their mean.
    s = bootstrap_summary([1.0, 3.0, math.nan], resamples=20000)
    assert (s.n, s.dropped, s.best) == (2, 1, 1.0)
    assert s.mean == pytest.approx(2.0, abs=0.02) and s.mean_std == pytest.approx(0.5 ** 0.5, abs=0.02)
    assert s.median == pytest.approx(2.0, abs=0.02) and s.median_std == pytest.approx(0.5 ** 0.5, abs=0.02)


def test_three_batched_keeps_the_lowest_validation_loss_of_each_triple() -> None:
    val = [0.3, 0.1, 0.2, 5.0, math.nan, 4.0, 9.0]
    test = [30.0, 10.0, 20.0, 50.0, 60.0, 40.0, 90.0]
    picked = three_batched(val, test, seed=0)
    assert len(picked) == 2  # the 7th run is left over
    import numpy as np

    order = np.random.default_rng(0).permutation(7)
    for k, p in enumerate(picked):
        trio = [i for i in order[3 * k : 3 * k + 3] if not math.isnan(val[i])]
        assert p == test[min(trio, key=lambda i: val[i])]


def _record(final: float, val: float = 1.0, status: str = "finished") -> RunRecord:
    return RunRecord(Path("."), {}, status, [{"step": 1, "wall": 2.0, "weight_steps": 10, "test/loss": final}],
                     {"test/loss": final, "val/loss": val})


def test_table_drops_and_counts_nan_and_bolds_within_error() -> None:
    groups = {"random": [_record(v) for v in (5.0, 7.0, math.nan)],
              "ours_wd_lr_m": [_record(v) for v in (1.0, 1.2, 1.1)],
              "random_validation": [_record(v, val=v) for v in (4.0, 2.0, 3.0)]}
    rows = table(groups, "test/loss")
    labels = [k for k, _, _ in rows]
    assert labels == ["random", "random_3_batched", "random_validation", "ours_wd_lr_m"]
    stats = dict((k, s) for k, s, _ in rows)
    assert (stats["random"].n, stats["random"].dropped) == (2, 1)
    assert stats["random_3_batched"].best == 2.0  # the triple's lowest validation loss
    text = markdown(rows, "test/loss")
    assert "| Ours WD+LR+M | 3 (0) | **" in text and "| Random | 2 (1) | 6" in text
    # `sweep-report --diverged-at 6` (Clarke et al.'s rule for F-MNIST, at 1e3) drops 7.0 too.
    capped = dict((k, s) for k, s, _ in table(groups, "test/loss", diverged_at=6.0))
    assert (capped["random"].n, capped["random"].dropped, capped["random"].mean) == (1, 2, 5.0)


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    shared = shared_data_dir()
    from bilevel.data import fetch_dataset

    fetch_dataset("uci_energy", tmp_path / "data", from_dir=shared / "uci")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "bilevel", "sweep", "onepass/uci_energy.yaml", "-a", "onepass/random.yaml",
           "-a", "onepass/ours_wd_lr.yaml", "--inits", "1", "--parallel", "1", "--out", str(out),
           "--set", f"data.data_dir={tmp_path / 'data'}", "--set", "run.max_steps=40",
           "--set", "logging.progress=false", "--set", "checkpoint.every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --parallel 1 runs in the sweep process, which dies at its 6th hyper-step: the first run
    # (4 hyper-steps) is finished, the second one killed half-way.
    first = subprocess.run(cmd, env={**env, "BILEVEL_FAULT": "hyper@6"}, capture_output=True, text=True,
                           check=False)
    assert first.returncode == -9 and "finished random/init-0000" in first.stdout, first
    done = out / "random" / "init-0000" / "summary.json"
    stamp = done.stat().st_mtime_ns
    killed_metrics = out / "ours_wd_lr" / "init-0000" / "metrics.jsonl"
    head = killed_metrics.read_text().splitlines()[0]
    again = [("2" if a == "1" and cmd[k - 1] == "--parallel" else a) for k, a in enumerate(cmd)]
    assert main(again[3:]) == 0  # the same sweep again (here on a pool of 2 workers)
    assert "skipped  random/init-0000" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == stamp  # not redone
    assert killed_metrics.read_text().splitlines()[0] == head  # resumed, not restarted
    killed = json.loads((out / "ours_wd_lr" / "init-0000" / "run.json").read_text())
    assert killed["status"] == "finished"
    assert main(["sweep-report", str(out), "--no-plots"]) == 0
    assert "| Ours WD+LR | 1 (0) |" in (out / "table.md").read_text()


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_a_cause_every_trial_shares_stops_the_sweep_with_its_exit_code(
        tmp_path: Path, parallel: str) -> None:
    """Missing data: one clear message and exit 3, not a traceback per trial; after the
    fetch, the same command runs every trial (nothing left behind blocks them)."""
    empty, out = tmp_path / "empty-data", tmp_path / "sweep"
    cmd = [sys.executable, "-m", "bilevel", "sweep", "onepass/uci_energy.yaml", "-a",
           "onepass/random.yaml", "-a", "onepass/ours_wd_lr.yaml", "--inits", "2",
           "--parallel", parallel, "--out", str(out), "--set", "run.max_steps=20",
           "--set", "logging.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BILEVEL_DATA": str(empty)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 3, r
    assert r.stderr.count("bilevel data fetch uci_energy") == 1 and "Traceback" not in r.stderr
    assert "sweep stopped" in r.stderr
    if parallel == "1":
        return
    from bilevel.data import fetch_dataset

    fetch_dataset("uci_energy", empty, from_dir=shared_data_dir() / "uci")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0 and "4 runs: 0 failed" in r.stdout, r


def test_sensitivity_report_over_T_and_i(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two cells and their Random rows, paired by initialisation: the table and heat-map."""
    from bilevel.data import fetch_dataset

    fetch_dataset("uci_energy", tmp_path / "data", from_dir=shared_data_dir() / "uci")
    common = ["--inits", "2", "--seed", "0", "--set", f"data.data_dir={tmp_path / 'data'}",
              "--set", "logging.progress=false"]
    for T in (1, 2):
        steps = f"run.max_steps={4 * T}"
        assert main(["sweep", "onepass/uci_energy.yaml", "-a", "onepass/random.yaml", *common,
                     "--out", str(tmp_path / f"random-T{T}"), "--set", steps,
                     "--set", f"algorithm.weight_steps={T}"]) == 0
        assert main(["sweep", "onepass/uci_energy.yaml", "-a", "onepass/ours_wd_lr_m.yaml", *common,
                     "--out", str(tmp_path / f"ours-T{T}-i3"), "--set", steps,
                     "--set", f"algorithm.weight_steps={T}", "--set", "algorithm.terms=3"]) == 0
    assert main(["onepass", "sensitivity", str(tmp_path)]) == 0
    text = (tmp_path / "sensitivity.md").read_text()
    assert "| T = 1 |" in text and "| T = 2 |" in text and "i = 3" in text
    assert text.count("/2)") == 2  # both cells paired with Random on both initialisations
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["onepass", "sensitivity", str(tmp_path / "random-T1")]) == 2  # no cells: exit 2


def test_a_sweep_continues_from_another_checkout_with_the_same_configs(tmp_path: Path) -> None:
    """sweep.json names config files by path; a moved checkout (same contents) continues the
    sweep with its own paths, and a changed file is refused, naming what differs."""
    from bilevel.errors import ConfigError
    from bilevel.sweep.plan import Plan, load_or_write

    def checkout(name: str, algo_text: str) -> tuple[str, str]:
        d = tmp_path / name
        d.mkdir()
        (d / "base.yaml").write_text("recipe: onepass\n")
        (d / "algo.yaml").write_text(algo_text)
        return str(d / "base.yaml"), str(d / "algo.yaml")

    base_a, algo_a = checkout("a", "algorithm: {name: ours}\n")
    base_b, algo_b = checkout("b", "algorithm: {name: ours}\n")
    base_c, algo_c = checkout("c", "algorithm: {name: lorraine}\n")
    out = tmp_path / "sweep"
    load_or_write(out, Plan((base_a,), {"algo": algo_a}, {}, 2))
    moved = load_or_write(out, Plan((base_b,), {"algo": algo_b}, {}, 2))
    assert moved.base == (base_b,) and moved.variants == {"algo": algo_b} and moved.inits == 2
    with pytest.raises(ConfigError, match=r"differs in variants"):
        load_or_write(out, Plan((base_c,), {"algo": algo_c}, {}, 2))
