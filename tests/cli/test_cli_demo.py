"""`make demo`'s pipeline through the real CLI on tiny settings (scikit-learn's digits instead
of MNIST, 40 weight steps): a sweep of Random and Ours WD+LR+M over shared initialisations,
then `sweep-report`'s table, figure and summary; and reports over several paired sweeps."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import run_cli

TINY = ["--set", "data.name=digits", "--set", "run.max_steps=40", "--set", "logging.every=10",
        "--set", "checkpoint.every=2", "--set", "logging.progress=false"]


def sweep(out: Path, *algorithms: str, seed: int = 0) -> None:
    flags = [a for name in algorithms for a in ("-a", f"onepass/{name}.yaml")]
    r = run_cli("sweep", "onepass/mnist.yaml", *flags, "--inits", "2", "--parallel", "1",
                "--seed", str(seed), "--out", out, *TINY)
    assert r.code == 0, r


def test_demo_sweep_reports_table_figure_and_what_was_learned(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    sweep(out, "random", "ours_wd_lr_m")
    r = run_cli("sweep-report", out, "--out", out / "report")
    assert r.code == 0, r
    report = out / "report"
    assert r.out.split() == [str(report / f) for f in
                             ("table.md", "table.csv", "summary.md", "loss_evolution.png")]
    table = (report / "table.md").read_text()
    assert "| Random | 2 (0) |" in table and "| Ours WD+LR+M | 2 (0) |" in table
    summary = (report / "summary.md").read_text()
    assert "**Ours WD+LR+M vs Random** over 2 shared initialisations" in summary
    assert "Its learning rate went from a median" in summary and "momentum" in summary
    # The paired runs really start from the same hyperparameters.
    inner = [json.loads((out / v / "init-0001" / "run.json").read_text())["config"]["inner"]
             for v in ("random", "ours_wd_lr_m")]
    assert inner[0] == inner[1]
    assert (report / "loss_evolution.png").stat().st_size > 10_000


def test_report_over_paired_sweeps_and_refusal_of_unpaired_ones(tmp_path: Path) -> None:
    first, later, other = tmp_path / "first", tmp_path / "later", tmp_path / "other"
    sweep(first, "random")
    sweep(later, "ours_wd_lr")  # a later sweep of another algorithm, same seed: still paired
    sweep(other, "ours_wd_lr_m", seed=1)
    r = run_cli("sweep-report", first, later, "--out", tmp_path / "both", "--no-plots")
    assert r.code == 0, r
    assert "**Ours WD+LR vs Random** over 2 shared" in (tmp_path / "both" / "summary.md").read_text()
    r = run_cli("sweep-report", first, other, "--no-plots")
    assert r.code != 0 and "are not paired sweeps" in r.err and "--seed" in r.err, r
    r = run_cli("sweep-report", first, first, "--no-plots")
    assert r.code != 0 and "'random' is in more than one" in r.err, r
