"""Summary tables of a report: Markdown and CSV, one row per (group, metric).

Bold in Markdown marks, per metric, every group whose bootstrap mean (or median) is within
its error of the best group's: value ≤ best + err (≥ best − err for higher-is-better).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from bilevel.report.collect import RunRecord
from bilevel.report.stats import BootstrapSummary, bootstrap_summary, higher_is_better

COLUMNS = ("group", "metric", "runs", "dropped", "mean", "mean_std", "median", "median_std",
           "best")


def summarise(groups: dict[str, list[RunRecord]]) -> list[tuple[str, str, BootstrapSummary]]:
    """Bootstrap statistics of every final metric for every group."""
    metrics: dict[str, None] = {}
    for runs in groups.values():
        for run in runs:
            metrics.update(dict.fromkeys(run.final))
    rows = []
    for metric in metrics:
        for label, runs in groups.items():
            values = [r.final[metric] for r in runs if metric in r.final]
            if values:
                stat = bootstrap_summary(values, lower_is_better=not higher_is_better(metric))
                rows.append((label, metric, stat))
    return rows


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _bold(rows: list[tuple[str, str, BootstrapSummary]], metric: str, field: str
          ) -> float | None:
    """The threshold within which a group's ``field`` counts as tied with the best."""
    stats = [s for _, m, s in rows if m == metric and not math.isnan(getattr(s, field))]
    if len(stats) < 2:
        return None
    up = higher_is_better(metric)
    err = f"{field}_std"
    best = (max if up else min)(stats, key=lambda s: getattr(s, field))
    return getattr(best, field) - getattr(best, err) if up else getattr(best, field) + getattr(
        best, err)


def write_markdown(rows: list[tuple[str, str, BootstrapSummary]], path: Path) -> Path:
    """A Markdown table: mean ± std, median ± std (bootstrap) and best per group and metric."""
    lines = ["| group | metric | runs | mean ± std | median ± std | best |",
             "|---|---|---:|---:|---:|---:|"]
    for label, metric, s in rows:
        cells = []
        for field in ("mean", "median"):
            text = f"{_fmt(getattr(s, field))} ± {_fmt(getattr(s, field + '_std'))}"
            limit = _bold(rows, metric, field)
            v = getattr(s, field)
            tied = limit is not None and (v >= limit if higher_is_better(metric) else v <= limit)
            cells.append(f"**{text}**" if tied else text)
        runs = f"{s.n}" + (f" (+{s.dropped} NaN)" if s.dropped else "")
        lines.append(f"| {label} | {metric} | {runs} | {cells[0]} | {cells[1]} | {_fmt(s.best)} |")
    path.write_text("\n".join(lines) + "\n\nBootstrap over runs (1000 resamples); best is the "
                    "minimum over runs (maximum for accuracies); NaN finals are dropped.\n")
    return path


def write_csv(rows: list[tuple[str, str, BootstrapSummary]], path: Path) -> Path:
    """The same statistics as CSV, at full precision."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for label, metric, s in rows:
            w.writerow([label, metric, s.n, s.dropped, repr(s.mean), repr(s.mean_std),
                        repr(s.median), repr(s.median_std), repr(s.best)])
    return path
