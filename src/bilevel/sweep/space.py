"""Search spaces: a declarative description of the hyperparameters a sweep draws.

A space is a plain mapping ``{dotted config key: {"dist": NAME, "low": a, "high": b}}``, so it
can live in a recipe (``SEARCH_SPACE``), in a YAML file (``--space``) or be translated for
other engines (Optuna, Ray Tune) without touching this module:

==================  ==========================================  ===========================
``dist``            value                                        example
==================  ==========================================  ===========================
``uniform``         ``U(low, high)``                             momentum ``U(0, 1)``
``log10_uniform``   ``10 ** U(low, high)`` (bounds in log10)     lr ``10**U(-6, -1)``
``int_uniform``     integer in ``[low, high]``                   hidden width
``choice``          one of ``values``                            activation
==================  ==========================================  ===========================

Draw ``i`` uses its own generator seeded with ``(seed, i)``, so the first N initialisations
of a sweep do not change when more are asked for, and every algorithm gets the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bilevel.errors import ConfigError

Space = Mapping[str, Mapping[str, Any]]
DISTS = ("uniform", "log10_uniform", "int_uniform", "choice")


def check_space(space: Space) -> None:
    """Raise :class:`ConfigError` naming every malformed entry of ``space``."""
    problems = []
    for key, d in space.items():
        dist = d.get("dist")
        if dist not in DISTS:
            problems.append(f"{key}: dist must be one of {DISTS}, got {dist!r}")
        elif dist == "choice":
            if not isinstance(d.get("values"), list) or not d["values"]:
                problems.append(f"{key}: choice needs a non-empty list `values`")
        elif not all(isinstance(d.get(b), (int, float)) for b in ("low", "high")):
            problems.append(f"{key}: {dist} needs numbers `low` and `high`, got {dict(d)}")
        elif d["low"] > d["high"]:
            problems.append(f"{key}: low ({d['low']}) must not exceed high ({d['high']})")
    if problems:
        raise ConfigError("invalid search space:\n  " + "\n  ".join(problems))


def sample(space: Space, index: int, *, seed: int = 0) -> dict[str, Any]:
    """Draw initialisation number ``index`` (``{key: value}``, keys in ``space`` order)."""
    check_space(space)
    rng = np.random.default_rng([seed, index])
    out: dict[str, Any] = {}
    for key, d in space.items():
        if d["dist"] == "choice":
            out[key] = d["values"][int(rng.integers(len(d["values"])))]
            continue
        u = float(rng.uniform(d["low"], d["high"]))
        if d["dist"] == "log10_uniform":
            out[key] = float(10.0 ** u)
        elif d["dist"] == "int_uniform":
            out[key] = int(rng.integers(int(d["low"]), int(d["high"]) + 1))
        else:
            out[key] = u
    return out


def overrides(values: Mapping[str, Any]) -> list[str]:
    """``--set`` strings for a draw (full float precision, parsed back exactly)."""
    return [f"{k}={v!r}" for k, v in values.items()]
