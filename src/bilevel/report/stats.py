"""Bootstrap statistics over runs, as in Clarke et al.'s tables (seeds.md §3.6).

For each group of runs take every run's final value of a metric, drop NaN (and values at or
above an optional divergence threshold), draw 1000 bootstrap resamples of the runs and report
the mean of the bootstrap means ± their std, the mean of the bootstrap medians ± their std,
and "best", the minimum over the original runs (maximum for higher-is-better metrics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapSummary:
    """Statistics of one metric over one group of runs (NaN when no run is left)."""

    n: int
    dropped: int
    mean: float
    mean_std: float
    median: float
    median_std: float
    best: float


def higher_is_better(metric: str) -> bool:
    """Accuracies and learned hyperparameters are not minimised; losses and errors are."""
    name = metric.lower()
    return "acc" in name


def bootstrap_summary(
    values: Sequence[float],
    *,
    resamples: int = 1000,
    seed: int = 0,
    lower_is_better: bool = True,
    diverged_at: float | None = None,
) -> BootstrapSummary:
    """Bootstrap mean ± std, median ± std and best of final values over runs.

    Args:
        values: one final value per run.
        resamples: number of bootstrap resamples (1000 in the paper).
        seed: seed of the resampling generator, so tables are reproducible.
        lower_is_better: whether "best" is the minimum (else the maximum).
        diverged_at: values ≥ this count as NaN (the paper used 1e3 for F-MNIST losses).
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    keep = np.isfinite(v)
    if diverged_at is not None:
        keep &= v < diverged_at
    kept = v[keep]
    dropped = int(len(v) - len(kept))
    if len(kept) == 0:
        return BootstrapSummary(0, dropped, *([math.nan] * 5))
    rng = np.random.default_rng(seed)
    samples = kept[rng.integers(0, len(kept), size=(resamples, len(kept)))]
    means = samples.mean(axis=1)
    medians = np.median(samples, axis=1)
    best = kept.min() if lower_is_better else kept.max()
    return BootstrapSummary(
        n=len(kept),
        dropped=dropped,
        mean=float(means.mean()),
        mean_std=float(means.std()),
        median=float(medians.mean()),
        median_std=float(medians.std()),
        best=float(best),
    )


def bootstrap_band(
    matrix: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column bootstrap median ± std over rows (runs × steps), NaN-aware."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, matrix.shape[0], size=(resamples, matrix.shape[0]))
    medians = np.nanmedian(matrix[idx], axis=1)  # (resamples, steps)
    return medians.mean(axis=0), medians.std(axis=0)
