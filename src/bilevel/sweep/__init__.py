"""Many runs of one recipe: variants (algorithms) × shared random initialisations.

    >>> from bilevel.sweep import sweep                                  # doctest: +SKIP
    >>> sweep(["onepass/uci_energy.yaml"], ["onepass/random.yaml", "onepass/ours_wd_lr_m.yaml"],
    ...       inits=20, out="runs/energy", parallel=2)

The core is engine-independent: a search space (:mod:`.space`), a plan that expands into
trials with shared draws (:mod:`.plan`), and an engine that runs trials and returns
:class:`TrialResult` s. ``local`` (:mod:`.local`) is a resumable process pool; other engines
(Optuna, Ray Tune) plug into :data:`ENGINES` with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError
from bilevel.sweep.local import TrialResult, run_local, run_trial, status
from bilevel.sweep.plan import Plan, Trial, default_space, load_or_write, variant_labels
from bilevel.sweep.space import DISTS, check_space, sample

ENGINES: dict[str, Callable[..., list[TrialResult]]] = {"local": run_local}

__all__ = ["DISTS", "ENGINES", "Plan", "Trial", "TrialResult", "check_space", "make_plan",
           "run_trial", "sample", "status", "sweep"]


def make_plan(base: Sequence[str], algorithms: Sequence[str] = (), *, inits: int, seed: int = 0,
              overrides: Sequence[str] = (), space: Mapping[str, Any] | None = None) -> Plan:
    """Validate the configs of every variant and build the plan (nothing runs).

    Args:
        base: config files shared by every variant (e.g. the data set's).
        algorithms: one config per variant, layered after ``base`` (labels: file stems).
        inits: number of shared random initialisations.
        seed: seed of the draws; initialisation ``i`` also gets ``run.seed = seed + i``.
        overrides: ``key=value`` applied to every run (before the drawn values).
        space: search space (default: the recipe's ``SEARCH_SPACE``).
    """
    from bilevel.recipes import find_config, get, resolve

    if inits < 1:
        raise ConfigError(f"--inits must be at least 1, got {inits}")
    variants = variant_labels([str(find_config(a)) for a in algorithms])
    base_paths = tuple(str(find_config(b)) for b in base)
    recipe = resolve(base_paths, overrides)[0]
    space = dict(space if space is not None else default_space(get(recipe)))
    check_space(space)
    plan = Plan(base_paths, variants, {k: dict(v) for k, v in space.items()}, inits, seed,
                tuple(overrides))
    for trial in plan.trials(Path("."))[: len(variants)]:  # every variant validates once
        resolve(trial.configs, trial.overrides)
    return plan


def sweep(base: Sequence[str], algorithms: Sequence[str] = (), *, inits: int, out: str | Path,
          parallel: int = 1, seed: int = 0, overrides: Sequence[str] = (),
          space: Mapping[str, Any] | None = None, engine: str = "local",
          on_result: Callable[[TrialResult], None] | None = None) -> list[TrialResult]:
    """Plan (or continue) a sweep in ``out`` and run it with ``engine``."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r} is not available; engines: {', '.join(ENGINES)}")
    plan = load_or_write(Path(out), make_plan(base, algorithms, inits=inits, seed=seed,
                                              overrides=overrides, space=space))
    trials = [t for t in plan.trials(Path(out)) if t.index < inits]
    return ENGINES[engine](trials, parallel=parallel, on_result=on_result)
