"""Sweep engines: where a scheduler's jobs run.

* :mod:`.local_engine` (default): a local process pool over run directories, with a ledger
  that makes sweeps reproducible and resumable (random, ASHA, PBT, and BO via Optuna);
* :mod:`.optuna_engine`: Optuna BO embedded, and many workers sharing one Optuna study
  (``--storage URL``), stale trials retried from their checkpoints;
* :mod:`.ray_engine`: Ray Tune (``ASHAScheduler``, ``PopulationBasedTraining``,
  ``OptunaSearch``), imported lazily (``pip install 'bilevel[ray]'``).
  :mod:`.ray_instance` starts its private local instance or joins a cluster.
"""

from bilevel.sweep.engines._jobs import JobResult, JobSpec, execute, warm_start
from bilevel.sweep.engines.local_engine import Ledger, best, run_scheduler, totals

__all__ = ["JobResult", "JobSpec", "Ledger", "best", "execute", "run_scheduler",
           "totals", "warm_start"]
