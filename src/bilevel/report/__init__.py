"""Reports over runs: bootstrap tables (Markdown + CSV) and PNG curves.

``make_report(["runs/*"], "report/")`` writes ``summary.md``, ``summary.csv``,
``curves.png`` and ``hyperparameters.png``; ``bilevel report`` calls it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bilevel.report.collect import RunRecord, find_runs, group_runs, load_run
from bilevel.report.plots import plot_report
from bilevel.report.stats import BootstrapSummary, bootstrap_summary
from bilevel.report.tables import summarise, write_csv, write_markdown

__all__ = [
    "BootstrapSummary",
    "RunRecord",
    "bootstrap_summary",
    "find_runs",
    "group_runs",
    "load_run",
    "make_report",
]


def make_report(patterns: Iterable[str], out: str | Path, *, plots: bool = True) -> list[Path]:
    """Collect runs, group them by config (seeds pooled), write tables and figures.

    Returns:
        The files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs([load_run(p) for p in find_runs(patterns)])
    rows = summarise(groups)
    files = [write_markdown(rows, out / "summary.md"), write_csv(rows, out / "summary.csv")]
    if plots:
        files += plot_report(groups, out)
    return files
