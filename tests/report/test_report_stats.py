"""Bootstrap statistics (seeds.md §3.6) and the report tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

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


def test_band_is_the_bootstrap_median_mean_and_spread() -> None:
    """Three runs (rows) by three steps (columns), against the exact bootstrap distribution.

    Column 0 is constant: every resample's median is 5, so the band is 5 ± 0. Column 1 is
    (0, 0, 1): a resample of three rows has median 1 iff it draws the last row at least
    twice, p = 3·(1/3)²·(2/3) + (1/3)³ = 7/27, so the band is p ± √(p(1 − p)) up to
    resampling noise (20000 resamples: standard error 0.003 on the mean). Column 2 is
    3 + 2 × column 1 and all columns share the resampled rows, so its band is exactly
    3 + 2·mid and 2·std."""
    m = np.array([[5.0, 0.0, 3.0], [5.0, 0.0, 3.0], [5.0, 1.0, 5.0]])
    mid, std = bootstrap_band(m, resamples=20000, seed=1)
    assert mid.shape == std.shape == (3,)
    assert (mid[0], std[0]) == (5.0, 0.0)
    p = 7 / 27
    assert abs(mid[1] - p) < 0.015 and abs(std[1] - math.sqrt(p * (1 - p))) < 0.015
    assert mid[2] == pytest.approx(3 + 2 * mid[1]) and std[2] == pytest.approx(2 * std[1])
    again = bootstrap_band(m, resamples=20000, seed=1)
    assert np.array_equal(again[0], mid) and np.array_equal(again[1], std)
