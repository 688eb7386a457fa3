"""Clarke et al.'s table and loss-evolution figure over a sweep directory (seeds.md §3.6).

For each algorithm (a variant of ``bilevel sweep``), take every run's final value of one
metric, drop NaN runs (and values ≥ ``diverged_at``) and count them, draw 1000 bootstrap
resamples, and report the mean of the bootstrap means ± their std, the mean of the bootstrap
medians ± their std, and "Best" = the minimum over the runs. Bold marks every value within
the error of the best one (value ≤ best + its std). Also:

* **Random (3-batched)**, derived from the ``random_validation`` runs: the runs are shuffled
  (seeded) into triples, and each triple keeps the run with the lowest final *validation*
  loss (``val/loss``); leftover runs are dropped.
* **Cost**: the median wall-clock seconds per run (from ``metrics.jsonl``'s ``wall``) and
  its ratio to ``random``'s, measured on the same machine in the same sweep.
* ``loss_evolution.png``: per algorithm, the bootstrap median ± std over runs of the metric
  against weight steps.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bilevel.errors import ConfigError
from bilevel.recipes.onepass.summary import final, median_seconds, paragraph
from bilevel.report.collect import RunRecord, load_run
from bilevel.report.stats import BootstrapSummary, bootstrap_band, bootstrap_summary

LABELS = {  # sweep variant (config stem) -> the paper's name, in the paper's row order
    "random": "Random", "random_lr": "Random (×LR)", "random_3_batched": "Random (3-batched)",
    "random_validation": "Random_Validation", "lorraine": "Lorraine", "baydin": "Baydin",
    "baydin_through_update": "Baydin (through the update)",
    "ours_wd_lr": "Ours WD+LR", "ours_wd_lr_m": "Ours WD+LR+M",
    "ours_wd_hdlr_m": "Ours WD+HDLR+M", "diff_through_opt": "Diff-through-Opt",
    "long_diff_through_opt_uci": "Long Diff-through-Opt",
    "full_diff_through_opt_uci": "Full Diff-through-Opt",
    "ours_wd_lr_m_initial_code": "Ours WD+LR+M (initial code)",
    "ours_wd_hdlr_m_initial_code": "Ours WD+HDLR+M (initial code)",
}
METRICS = ("test/loss_unnormalised", "test/perplexity", "test/loss")


def load_sweep(*sweep_dirs: str | Path) -> dict[str, list[RunRecord]]:
    """``{variant: runs}`` of one or more sweep directories (runs without ``run.json`` are
    skipped). Several directories must share ``--seed``, the search space, ``--set``
    overrides and base configs, so that initialisation ``i`` is the same run setting in all
    of them and the runs stay paired."""
    groups: dict[str, list[RunRecord]] = {}
    first: tuple[Path, object] | None = None
    for root in map(Path, sweep_dirs):
        if not (root / "sweep.json").is_file():
            raise ConfigError(f"{root} has no sweep.json: give a directory made by `bilevel sweep`")
        plan = json.loads((root / "sweep.json").read_text())
        key = (plan.get("seed", 0), plan["space"], plan.get("overrides", []), plan["base"])
        if first is None:
            first = (root, key)
        elif key != first[1]:
            raise ConfigError(f"{root} and {first[0]} are not paired sweeps (their --seed, "
                              "search space, --set overrides or base configs differ): report "
                              "them separately")
        for v in plan["variants"]:
            if v in groups:
                raise ConfigError(f"variant {v!r} is in more than one of {', '.join(map(str, sweep_dirs))}")
            groups[v] = [load_run(p) for p in sorted((root / v).glob("init-*"))
                         if (p / "run.json").is_file()]
    return groups


def three_batched(val: list[float], test: list[float], *, seed: int = 0) -> list[float]:
    """Random (3-batched): shuffle runs into triples, keep each triple's lowest-``val`` run's
    ``test`` value (NaN validation losses never win; a triple of NaNs gives NaN)."""
    order = np.random.default_rng(seed).permutation(len(val))
    picked = []
    for k in range(0, len(order) - len(order) % 3, 3):
        trio = order[k : k + 3]
        v = [val[i] if math.isfinite(val[i]) else math.inf for i in trio]
        best = trio[int(np.argmin(v))]
        picked.append(test[best] if math.isfinite(val[best]) else math.nan)
    return picked


def table(groups: dict[str, list[RunRecord]], metric: str, *,
          diverged_at: float | None = None) -> list[tuple[str, BootstrapSummary, float]]:
    """Rows ``(variant, statistics, median seconds per run)`` in the paper's order."""
    finals = {v: [final(r, metric) for r in runs] for v, runs in groups.items() if runs}
    seconds = {v: median_seconds(runs) for v, runs in groups.items() if runs}
    if groups.get("random_validation"):
        runs = groups["random_validation"]
        finals["random_3_batched"] = three_batched([final(r, "val/loss") for r in runs],
                                                   finals["random_validation"])
        seconds["random_3_batched"] = 3 * seconds["random_validation"]
    order = [k for k in LABELS if k in finals] + sorted(k for k in finals if k not in LABELS)
    return [(k, bootstrap_summary(finals[k], diverged_at=diverged_at), seconds[k]) for k in order]


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def markdown(rows: list[tuple[str, BootstrapSummary, float]], metric: str) -> str:
    """The table in Markdown, bold within error of the best mean / median / best."""
    live = [s for _, s, _ in rows if s.n]
    thresholds = {f: min((getattr(s, f) + getattr(s, f + "_std") for s in live
                          if getattr(s, f) == min(getattr(x, f) for x in live)), default=math.nan)
                  for f in ("mean", "median")}
    best_best = min((s.best for s in live), default=math.nan)
    base = next((sec for k, _, sec in rows if k == "random"), math.nan)
    lines = [f"| method | runs (NaN) | {metric} mean | median | best | s/run | × Random |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, s, sec in rows:
        cells = []
        for f in ("mean", "median"):
            text = f"{_fmt(getattr(s, f))} ± {_fmt(getattr(s, f + '_std'))}"
            cells.append(f"**{text}**" if s.n and getattr(s, f) <= thresholds[f] else text)
        best = _fmt(s.best)
        cells.append(f"**{best}**" if s.n and s.best == best_best else best)
        ratio = sec / base if base == base and base > 0 else math.nan
        lines.append(f"| {LABELS.get(key, key)} | {s.n} ({s.dropped}) | {' | '.join(cells)} | "
                     f"{_fmt(sec)} | {_fmt(ratio)} |")
    return "\n".join(lines) + "\n"


def loss_evolution(groups: dict[str, list[RunRecord]], metric: str, path: Path) -> Path:
    """Bootstrap median ± std over runs of ``metric`` against weight steps, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in [k for k in LABELS if k in groups] + sorted(set(groups) - set(LABELS)):
        curves = [[(r["weight_steps"], r.get(metric, math.nan)) for r in run.records
                   if "weight_steps" in r] for run in groups[key]]
        curves = [c for c in curves if c]
        if not curves:
            continue
        length = max(len(c) for c in curves)
        steps = next(np.array([s for s, _ in c]) for c in curves if len(c) == length)
        m = np.full((len(curves), length), np.nan)
        for i, c in enumerate(curves):  # a diverged run stops early: NaN afterwards
            m[i, : len(c)] = [v for _, v in c]
        mid, std = bootstrap_band(m)
        ax.plot(steps, mid, label=LABELS.get(key, key), lw=1.5)
        ax.fill_between(steps, mid - std, mid + std, alpha=0.2)
    runs = [r for rs in groups.values() for r in rs]
    data = sorted({str(r.config.get("data", {}).get("name", "?")) for r in runs})
    inits = len({r.path.name for r in runs})
    ax.set_title(f"{', '.join(data)}: {inits} shared initialisations", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("weight steps")
    ax.set_ylabel(f"{metric} (bootstrap median ± std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(sweep_dirs: str | Path | Sequence[str | Path], *, metric: str | None = None,
                 out: str | Path | None = None, plots: bool = True,
                 diverged_at: float | None = None) -> list[Path]:
    """Write ``table.md``, ``table.csv``, ``summary.md`` (what was learned, run by run against
    Random) and ``loss_evolution.png`` for one or more paired sweeps; return their paths."""
    dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    groups = load_sweep(*dirs)
    if metric is None:
        have = {k for runs in groups.values() for r in runs for k in r.final}
        metric = next((m for m in METRICS if m in have), None)
        if metric is None:
            raise ConfigError(f"no run in {' '.join(map(str, dirs))} has a final "
                              f"{' / '.join(METRICS)}; pass --metric")
    rows = table(groups, metric, diverged_at=diverged_at)
    dest = Path(out or dirs[0])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "table.md").write_text(markdown(rows, metric))
    with (dest / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "metric", "runs", "dropped", "mean", "mean_std", "median",
                    "median_std", "best", "seconds_per_run"])
        for key, s, sec in rows:
            w.writerow([key, metric, s.n, s.dropped, s.mean, s.mean_std, s.median,
                        s.median_std, s.best, sec])
    (dest / "summary.md").write_text(paragraph(groups, metric, labels=LABELS))
    files = [dest / "table.md", dest / "table.csv", dest / "summary.md"]
    if plots:
        files.append(loss_evolution(groups, metric, dest / "loss_evolution.png"))
    return files
