"""Sweep schedulers: pure decision logic (which trial runs, how long, with what config).

* :class:`RandomSearch`: independent draws, each trained to the full budget;
* :class:`ASHA`: asynchronous successive halving with promotions (Li et al. 2020);
* :class:`PBT`: population based training, truncation selection, exploit = copy the donor's
  checkpoint, explore = perturb ×1.2/×0.8 or resample (Jaderberg et al. 2017);
* Bayesian optimisation lives in :mod:`bilevel.sweep.engines.optuna_engine` (TPE / GP).

Engines (:mod:`bilevel.sweep.engines`) execute the :class:`Job` s against run directories.
"""

from bilevel.sweep.schedulers._base import AbstractScheduler, Job, score
from bilevel.sweep.schedulers.asha import ASHA, RandomSearch, rung_budgets
from bilevel.sweep.schedulers.pbt import PBT
from bilevel.sweep.space import Param, Space, seeded_rng

__all__ = ["ASHA", "PBT", "AbstractScheduler", "Job", "Param", "RandomSearch", "Space",
           "rung_budgets", "score", "seeded_rng"]
