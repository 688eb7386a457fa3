"""Bootstrap statistics (seeds.md §3.6) and the report tables."""

from __future__ import annotations

import math

import numpy as np

from bilevel.report import bootstrap_summary
from bilevel.report.stats import bootstrap_band


def test_constant_values_have_zero_spread() -> None:
    s = bootstrap_summary([2.0, 2.0, 2.0])
    assert (s.n, s.mean, s.mean_std, s.median, s.median_std, s.best) == (3, 2.0, 0.0, 2.0, 0.0, 2.0)


def test_nan_and_diverged_runs_dropped_and_best_is_min() -> None:
    s = bootstrap_summary([1.0, math.nan, 3.0, 5e3], diverged_at=1e3)
    assert s.n == 2 and s.dropped == 2 and s.best == 1.0
    assert 1.0 <= s.mean <= 3.0 and s.mean_std > 0
    assert bootstrap_summary([1.0, 3.0], lower_is_better=False).best == 3.0


def test_matches_plain_bootstrap_and_is_reproducible() -> None:
    values = np.random.default_rng(0).normal(size=20)
    s = bootstrap_summary(values, seed=7)
    assert s == bootstrap_summary(values, seed=7)
    assert abs(s.mean - values.mean()) < 0.1
    assert abs(s.mean_std - values.std() / math.sqrt(20)) < 0.05


def test_all_nan_gives_nan_row() -> None:
    s = bootstrap_summary([math.nan])
    assert s.n == 0 and s.dropped == 1 and math.isnan(s.mean)


def test_band_shape() -> None:
    mid, std = bootstrap_band(np.arange(12.0).reshape(3, 4))
    assert mid.shape == std.shape == (4,)
