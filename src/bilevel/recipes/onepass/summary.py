"""A paragraph saying what a sweep learned, from runs paired by initialisation.

``bilevel sweep`` gives every algorithm the same initial hyperparameters and weights for
initialisation ``i`` (directory ``init-<i>``), so each algorithm can be compared with the
baseline (Random) run by run, not only through medians. For every other algorithm the
paragraph states:

* its median final metric against the baseline's (and the median final accuracy, when the
  runs log one), and on how many shared initialisations it ended better than the baseline;
* for each hyperparameter it learns: the median over runs of the initial value (the config's
  ``inner.<name>``) and of the final value (``hyper/<name>``, or the median over weights
  ``hyper/<name>_q50`` for per-weight values), and the median factor by which it changed;
* the median wall-clock per run relative to the baseline's, and how many runs diverged.
"""

from __future__ import annotations

import math

import numpy as np

from bilevel.report.collect import RunRecord
from bilevel.report.stats import higher_is_better

_NAMES = {"lr": "learning rate", "weight_decay": "weight decay", "momentum": "momentum"}


def final(run: RunRecord, metric: str) -> float:
    """The run's final value of ``metric`` (NaN when missing or not finished)."""
    return float(run.final.get(metric, math.nan)) if run.status == "finished" else math.nan


def paired(groups: dict[str, list[RunRecord]], variant: str, baseline: str,
           metric: str) -> list[tuple[float, float]]:
    """``(variant, baseline)`` final values of the initialisations both finished, finite."""
    mine, base = ({r.path.name: final(r, metric) for r in groups[v]} for v in (variant, baseline))
    return [(mine[k], base[k]) for k in sorted(mine.keys() & base.keys())
            if math.isfinite(mine[k]) and math.isfinite(base[k])]


def learned(runs: list[RunRecord]) -> dict[str, tuple[float, float]]:
    """``{name: (median initial value, median final value)}`` of each learned hyperparameter."""
    out: dict[str, tuple[float, float]] = {}
    names = {n for r in runs for n in r.config.get("algorithm", {}).get("learn", [])}
    for name in sorted(names):
        pairs = []
        for r in runs:
            end = r.final.get(f"hyper/{name}", r.final.get(f"hyper/{name}_q50", math.nan))
            start = r.config.get("inner", {}).get(name, math.nan)
            if r.status == "finished" and math.isfinite(end) and math.isfinite(start):
                pairs.append((start, end))
        if pairs:
            a = np.asarray(pairs)
            out[name] = (float(np.median(a[:, 0])), float(np.median(a[:, 1])))
    return out


def _median(runs: list[RunRecord], metric: str) -> float:
    v = [x for x in (final(r, metric) for r in runs) if math.isfinite(x)]
    return float(np.median(v)) if v else math.nan


def median_seconds(runs: list[RunRecord]) -> float:
    """Median wall-clock seconds of the finished runs (``metrics.jsonl``'s last ``wall``)."""
    walls = [r.records[-1]["wall"] for r in runs if r.records and r.status == "finished"]
    return float(np.median(walls)) if walls else math.nan


def _g(x: float) -> str:
    return f"{x:.3g}"


def paragraph(groups: dict[str, list[RunRecord]], metric: str, *, labels: dict[str, str],
              baseline: str = "random") -> str:
    """The summary in Markdown (one paragraph per algorithm other than ``baseline``)."""
    if baseline not in groups or not groups[baseline]:
        return f"No `{baseline}` runs in this sweep: nothing to compare with.\n"
    base = groups[baseline]
    name = labels.get(baseline, baseline)
    accuracy = metric.replace("loss_unnormalised", "accuracy").replace("loss", "accuracy")
    higher = higher_is_better(metric)
    text = []
    for variant, runs in groups.items():
        if variant == baseline or not runs:
            continue
        pairs = paired(groups, variant, baseline, metric)
        wins = sum((m > b) if higher else (m < b) for m, b in pairs)
        lines = [f"**{labels.get(variant, variant)} vs {name}** over {len(pairs)} shared "
                 f"initialisations: median final `{metric}` {_g(_median(runs, metric))} against "
                 f"{_g(_median(base, metric))}"]
        if metric != accuracy and any(accuracy in r.final for r in runs):
            lines[-1] += (f" (median `{accuracy}` {100 * _median(runs, accuracy):.1f} % against "
                          f"{100 * _median(base, accuracy):.1f} %)")
        lines[-1] += f"; {'higher' if higher else 'lower'} than {name} on {wins} of {len(pairs)} initialisations."
        per_weight = {n for r in runs for n in r.config.get("algorithm", {}).get("per_weight", [])}
        for hp, (start, end) in learned(runs).items():
            what = _NAMES.get(hp, hp) + (" (per weight; median over weights)" if hp in per_weight else "")
            lines.append(f"Its {what} went from a median {_g(start)} at the start to {_g(end)} "
                         f"at the end (×{_g(end / start)}).")
        nan = sum(r.status == "finished" and not math.isfinite(final(r, metric)) for r in runs)
        ratio = median_seconds(runs) / median_seconds(base)
        lines.append(f"A run took {_g(ratio)}× {name}'s wall-clock (median), and {nan} of "
                     f"{len(runs)} runs diverged.")
        text.append(" ".join(lines))
    head = (f"Each algorithm started from the same initial hyperparameters and weights as "
            f"{name} on every initialisation (paired runs); medians are over runs.")
    return "\n\n".join([head, *text]) + "\n"

