"""PNG figures of a report: learning curves and hyperparameter trajectories (matplotlib Agg).

Each run is a thin line coloured by its group; a group of several runs also gets its
bootstrap median ± std band (as Clarke et al.'s loss-evolution figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bilevel.report.collect import RunRecord
from bilevel.report.stats import bootstrap_band
from bilevel.run.metrics import series


def metric_keys(groups: dict[str, list[RunRecord]]) -> list[str]:
    """Every numeric metric logged by any run, in first-seen order."""
    keys: dict[str, None] = {}
    for runs in groups.values():
        for run in runs:
            for rec in run.records:
                for k, v in rec.items():
                    if k not in ("step", "wall") and isinstance(v, (int, float)):
                        keys.setdefault(k, None)
    return list(keys)


def _band(runs: list[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    curves = [series(r.records, key) for r in runs]
    common = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
    if len(runs) < 2 or not common:
        return None
    matrix = np.array([[dict(zip(s, v, strict=True))[t] for t in common] for s, v in curves])
    mid, std = bootstrap_band(matrix)
    return np.array(common), mid, std


def plot_metrics(groups: dict[str, list[RunRecord]], keys: list[str], path: Path, *,
                 title: str) -> Path | None:
    """One panel per metric key, all runs; ``None`` when there is nothing to draw."""
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys, strict=False):
        positive = True
        for i, (label, runs) in enumerate(groups.items()):
            c = colours[i % len(colours)]
            for j, run in enumerate(runs):
                steps, values = series(run.records, key)
                positive &= all(v > 0 for v in values if v == v)
                ax.plot(steps, values, color=c, lw=0.8, alpha=0.5,
                        label=label if j == 0 else None)
            band = _band(runs, key)
            if band is not None:
                steps, mid, std = band
                ax.plot(steps, mid, color=c, lw=1.8)
                ax.fill_between(steps, mid - std, mid + std, color=c, alpha=0.2)
        if positive and (key.startswith("hyper/") or "loss" in key):
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_report(groups: dict[str, list[RunRecord]], out: Path) -> list[Path]:
    """Write ``curves.png`` (losses and other metrics) and ``hyperparameters.png``."""
    keys = metric_keys(groups)
    hyper = [k for k in keys if k.startswith(("hyper/", "hypergrad/"))]
    other = [k for k in keys if k not in hyper]
    made = [
        plot_metrics(groups, other, out / "curves.png", title="learning curves"),
        plot_metrics(groups, hyper, out / "hyperparameters.png",
                     title="hyperparameter trajectories"),
    ]
    return [p for p in made if p is not None]
