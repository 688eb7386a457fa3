"""ASHA promotions and PBT exploit/explore decisions against hand-computed schedules.

The toy objective is deterministic: trial ``t`` trained to budget ``r`` scores
``BASE[t] + 1/r`` (lower is better), so every decision can be worked out on paper.
"""

from __future__ import annotations

import math

import pytest

from bilevel.errors import ConfigError
from bilevel.sweep.schedulers import ASHA, PBT, RandomSearch, Space, rung_budgets

SPACE = Space.from_dict({"inner.lr": {"dist": "log10_uniform", "low": -6.0, "high": -1.0},
                         "inner.momentum": {"dist": "uniform", "low": 0.0, "high": 1.0}})
BASE = [5.0, 3.0, 8.0, 1.0, 4.0, 7.0, 2.0, 6.0]


def toy(trial: int, budget: int) -> float:
    return BASE[trial] + 1.0 / budget


def drive(scheduler, *, limit: int = 100) -> list[tuple[int, int, str]]:
    """Run sequentially (one worker); the schedule as (trial, budget, kind)."""
    schedule = []
    while (job := scheduler.suggest()) is not None and len(schedule) < limit:
        schedule.append((job.trial, job.budget, job.kind))
        scheduler.report(job, toy(job.trial, job.budget))
    return schedule


def test_rung_budgets():
    assert rung_budgets(min_resource=1, max_resource=4, reduction_factor=2) == [1, 2, 4]
    assert rung_budgets(min_resource=10, max_resource=4000, reduction_factor=4) == [
        10, 40, 160, 640, 2560, 4000]
    with pytest.raises(ConfigError, match="reduction-factor"):
        rung_budgets(min_resource=1, max_resource=4, reduction_factor=1)


def test_asha_promotions_match_the_hand_computed_schedule():
    asha = ASHA(SPACE, min_resource=1, max_resource=4, reduction_factor=2, max_trials=6, seed=0)
    # Worked by hand: rung k promotes the best not-yet-promoted of its top floor(n_k / 2).
    assert drive(asha) == [
        (0, 1, "new"),        # nothing finished: new trial 0 (scores 6 at r=1)
        (1, 1, "new"),        # rung0 {0:6}: top floor(1/2) = none
        (1, 2, "continue"),   # rung0 {0:6, 1:4}: top-1 = [1] -> promote to r=2 (3.5)
        (2, 1, "new"),        # rung1 {1}: top none; rung0 top-1 = [1], promoted
        (3, 1, "new"),        # rung0 {0:6, 1:4, 2:9}: top-1 = [1], promoted
        (3, 2, "continue"),   # rung0 {.., 3:2}: top-2 = [3, 1] -> promote 3 (1.5)
        (3, 4, "continue"),   # rung1 {1:3.5, 3:1.5}: top-1 = [3] -> promote to the top
        (4, 1, "new"),        # rung1 [3] and rung0 [3, 1] all promoted
        (5, 1, "new"),        # rung0 top-2 of 5 = [3, 1], promoted
        (4, 2, "continue"),   # rung0 top-3 of 6 = [3, 1, 4] -> promote 4; then max_trials
    ]
    assert asha.done
    assert asha.results[2] == {3: 1.25}


def test_asha_never_promotes_a_diverged_trial_and_is_seeded():
    asha = ASHA(SPACE, min_resource=1, max_resource=2, reduction_factor=2, max_trials=2, seed=3)
    j0 = asha.suggest()
    asha.report(j0, math.nan)
    j1 = asha.suggest()
    asha.report(j1, math.inf)
    assert asha.suggest() is None and asha.done
    # Trial t starts from initialisation t of `bilevel sweep --inits` (seed 3): reproducible.
    assert j1.config == SPACE.draw(1, seed=3)
    again = ASHA(SPACE, min_resource=1, max_resource=2, reduction_factor=2, max_trials=2, seed=3)
    assert again.suggest().config == j0.config
    lo, hi = SPACE["inner.lr"].natural_bounds()
    assert all(lo < j.config["inner.lr"] < hi for j in (j0, j1))


def test_random_search_runs_each_trial_to_the_full_budget():
    rs = RandomSearch(SPACE, max_resource=4, max_trials=3, seed=0)
    assert drive(rs) == [(0, 4, "new"), (1, 4, "new"), (2, 4, "new")]
    assert rs.done


def test_pbt_truncation_selection_matches_the_hand_computed_schedule():
    pbt = PBT(SPACE, population=4, interval=2, max_resource=6, quantile=0.25,
              resample_probability=0.0, factors=(2.0,), seed=0)
    first = dict(pbt.configs)
    schedule = drive(pbt)
    # BASE[:4] = [5, 3, 8, 1]: rank [3, 1, 0, 2]; n = ceil(4 * 0.25) = 1: trial 2 (worst)
    # copies trial 3 (the only top member) in each generation, others continue.
    assert schedule == [(0, 2, "new"), (1, 2, "new"), (2, 2, "new"), (3, 2, "new"),
                        (0, 4, "continue"), (1, 4, "continue"), (2, 4, "exploit"),
                        (3, 4, "continue"),
                        (0, 6, "continue"), (1, 6, "continue"), (2, 6, "exploit"),
                        (3, 6, "continue")]
    assert [h["exploits"] for h in pbt.history] == [{2: 3}, {2: 3}]
    # Explore with factor 2 and no resampling: trial 2 = trial 3's config doubled, clipped.
    lr, mom = SPACE["inner.lr"], SPACE["inner.momentum"]
    assert pbt.configs[2]["inner.lr"] == pytest.approx(lr.clip(first[3]["inner.lr"] * 2))
    assert pbt.configs[2]["inner.momentum"] == pytest.approx(
        mom.clip(first[3]["inner.momentum"] * 2))
    assert pbt.configs[2]["inner.momentum"] < 1.0 and pbt.done
    for t in (0, 1, 3):
        assert pbt.configs[t] == first[t]


def test_pbt_exploit_jobs_name_the_donors_latest_job():
    pbt = PBT(SPACE, population=4, interval=2, max_resource=4, seed=0)
    jobs = []
    while (job := pbt.suggest()) is not None:
        jobs.append(job)
        pbt.report(job, toy(job.trial, job.budget))
    exploit = next(j for j in jobs if j.kind == "exploit")
    donor_gen0 = next(j for j in jobs if j.trial == exploit.donor and j.rung == 0)
    assert exploit.info["donor_job"] == donor_gen0.id and exploit.start == 2


def test_pbt_resample_and_perturb_are_seeded():
    def run(seed):
        pbt = PBT(SPACE, population=8, interval=1, max_resource=3, quantile=0.25,
                  resample_probability=0.5, seed=seed)
        drive(pbt)
        return pbt.configs, pbt.history
    assert run(1) == run(1)
    assert run(1)[0] != run(2)[0]
    _, history = run(1)
    assert all(set(h["exploits"]) == {2, 5} for h in history)  # BASE: the two worst
    assert all(set(h["exploits"].values()) <= {3, 6} for h in history)  # the two best


def test_pbt_rejects_bad_settings():
    with pytest.raises(ConfigError, match="population"):
        PBT(SPACE, population=1, interval=1, max_resource=2)
    with pytest.raises(ConfigError, match="quantile"):
        PBT(SPACE, population=4, interval=1, max_resource=2, quantile=0.9)


def test_space_parsing_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"inner\.lr"):
        Space.from_dict({"inner.lr": {"dist": "normal", "low": 0, "high": 1}})
    with pytest.raises(ConfigError, match="--search"):
        SPACE.restrict(["inner.nope"])
