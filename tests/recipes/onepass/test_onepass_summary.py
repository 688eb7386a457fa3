"""sweep-report's summary.md: paired comparisons with Random and the learned hyperparameters."""

from __future__ import annotations

import math
from pathlib import Path

from bilevel.recipes.onepass.summary import learned, paired, paragraph
from bilevel.report.collect import RunRecord


def _run(init: int, final: float, *, lr0: float = 1e-3, lr1: float | None = None,
         status: str = "finished", wall: float = 2.0) -> RunRecord:
    learn = ["lr"] if lr1 is not None else []
    fin = {"test/loss": final, "test/accuracy": 1.0 - final / 10}
    if lr1 is not None:
        fin["hyper/lr"] = lr1
    return RunRecord(Path(f"init-{init:04d}"), {"inner": {"lr": lr0}, "algorithm": {"learn": learn}},
                     status, [{"step": 1, "wall": wall}], fin)


def test_runs_are_paired_by_initialisation_and_nan_or_unfinished_pairs_dropped() -> None:
    groups = {"random": [_run(0, 3.0), _run(1, 2.0), _run(2, 1.0), _run(3, 5.0)],
              "ours": [_run(0, 1.0, lr1=1e-2), _run(1, 2.5, lr1=1e-2), _run(2, math.nan, lr1=1e-2),
                       _run(3, 0.1, lr1=1e-2, status="failed")]}
    assert paired(groups, "ours", "random", "test/loss") == [(1.0, 3.0), (2.5, 2.0)]


def test_paragraph_counts_wins_and_reports_median_start_and_end_of_what_was_learned() -> None:
    groups = {"random": [_run(i, v, wall=2.0) for i, v in enumerate((4.0, 6.0, 8.0))],
              "ours_wd_lr_m": [_run(0, 1.0, lr0=1e-4, lr1=1e-2, wall=3.0),
                               _run(1, 7.0, lr0=1e-3, lr1=2e-2, wall=3.0),
                               _run(2, 2.0, lr0=1e-2, lr1=4e-2, wall=3.0)]}
    assert learned(groups["ours_wd_lr_m"]) == {"lr": (1e-3, 2e-2)}
    text = paragraph(groups, "test/loss", labels={"random": "Random", "ours_wd_lr_m": "Ours"})
    assert "**Ours vs Random** over 3 shared initialisations" in text
    assert "median final `test/loss` 2 against 6" in text
    assert "(median `test/accuracy` 80.0 % against 40.0 %)" in text
    assert "lower than Random on 2 of 3 initialisations" in text  # init 1: 7 > 6
    assert "learning rate went from a median 0.001 at the start to 0.02 at the end (×20)" in text
    assert "took 1.5× Random's wall-clock" in text


def test_higher_is_better_metrics_count_wins_upwards() -> None:
    groups = {"random": [_run(0, 0.0), _run(1, 0.0)], "ours": [_run(0, 5.0), _run(1, -5.0)]}
    text = paragraph(groups, "test/accuracy", labels={})
    assert "higher than random on 1 of 2" in text


def test_without_random_runs_the_summary_says_so() -> None:
    assert "No `random` runs" in paragraph({"ours": [_run(0, 1.0)]}, "test/loss", labels={})
