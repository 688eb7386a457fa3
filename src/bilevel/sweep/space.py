"""Search spaces: the hyperparameters a sweep draws, in one description for every engine.

A space is written as a plain mapping ``{dotted config key: {"dist": NAME, "low": a, "high": b}}``
(:data:`SpaceDict`), so it lives in a recipe (``SEARCH_SPACE``, e.g. Clarke et al.'s ranges in
``bilevel.recipes.onepass.recipe``), in a YAML file (``--space``), or is translated for Optuna and
Ray Tune by :meth:`Param.to_optuna` / :meth:`Param.to_ray`:

==================  ==========================================  ===========================
``dist``            value                                        example
==================  ==========================================  ===========================
``uniform``         ``U(low, high)``                             momentum ``U(0, 1)``
``log10_uniform``   ``10 ** U(low, high)`` (bounds in log10)     lr ``10**U(-6, -1)``
``int_uniform``     integer in ``[low, high]``                   hidden width
``choice``          one of ``values``                            activation
==================  ==========================================  ===========================

Two readers of the one form:

* :func:`sample` draws the shared initialisations of ``bilevel sweep --inits``. Draw ``i``
  uses its own generator seeded with ``(seed, i)``, so the first N initialisations of a sweep
  do not change when more are asked for, and every algorithm gets the same ones.
* :class:`Space` (continuous ``uniform`` / ``log10_uniform`` only) is what the schedulers
  (ASHA, PBT, BO) search. Its values are kept strictly inside ``(low, high)`` by ``1e-6`` of
  the width, because recipes validate open intervals (momentum < 1, as Clarke et al. clip it
  to ``1 - 1e-6``); :meth:`Space.draw` is :func:`sample`'s draw so clipped, so trial ``t``
  of a scheduled sweep starts where initialisation ``t`` of a plain sweep does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bilevel.errors import ConfigError

SpaceDict = Mapping[str, Mapping[str, Any]]
DISTS = ("uniform", "log10_uniform", "int_uniform", "choice")


def check_space(space: SpaceDict) -> None:
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


def sample(space: SpaceDict, index: int, *, seed: int = 0) -> dict[str, Any]:
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


# -- the schedulers' typed form ------------------------------------------------------

Dist = Literal["uniform", "log10_uniform"]
_MARGIN = 1e-6


@dataclass(frozen=True)
class Param:
    """One searched config key: ``dist`` over ``[low, high]`` (exponents for log10)."""

    key: str
    dist: Dist
    low: float
    high: float

    @property
    def log(self) -> bool:
        return self.dist == "log10_uniform"

    def _to_unit(self, value: float) -> float:
        """The coordinate in which the distribution is uniform (log10 for log params)."""
        return math.log10(value) if self.log else value

    def _from_unit(self, x: float) -> float:
        return 10.0 ** x if self.log else x

    def clip(self, value: float) -> float:
        """``value`` moved strictly inside the range (by 1e-6 of its width)."""
        eps = _MARGIN * (self.high - self.low)
        x = self._to_unit(value) if value > 0 or not self.log else self.low
        return self._from_unit(min(max(x, self.low + eps), self.high - eps))

    def sample(self, rng: random.Random) -> float:
        """A natural value drawn from the distribution."""
        return self.clip(self._from_unit(rng.uniform(self.low, self.high)))

    def natural_bounds(self) -> tuple[float, float]:
        eps = _MARGIN * (self.high - self.low)
        return self._from_unit(self.low + eps), self._from_unit(self.high - eps)

    def to_optuna(self) -> Any:
        """An ``optuna.distributions.FloatDistribution`` over natural values."""
        from optuna.distributions import FloatDistribution

        lo, hi = self.natural_bounds()
        return FloatDistribution(lo, hi, log=self.log)

    def to_ray(self) -> Any:
        """A ``ray.tune`` sampler over natural values (``loguniform`` for log params)."""
        from ray import tune

        lo, hi = self.natural_bounds()
        return tune.loguniform(lo, hi) if self.log else tune.uniform(lo, hi)


class Space(Mapping[str, Param]):
    """An ordered mapping ``config key -> Param``; order fixes the sampling order."""

    def __init__(self, params: Mapping[str, Param]) -> None:
        self._params = dict(params)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Mapping[str, Any]]) -> Space:
        """Parse the recipes' dict form.

        Raises:
            ConfigError: naming the key, for an unknown ``dist`` or ``low >= high``.
        """
        params = {}
        for key, d in spec.items():
            dist = d.get("dist")
            if dist not in ("uniform", "log10_uniform"):
                raise ConfigError(f"search space {key}: dist = {dist!r}; use 'uniform' or "
                                  "'log10_uniform' (low/high are then exponents)")
            low, high = float(d["low"]), float(d["high"])
            if not low < high:
                raise ConfigError(f"search space {key}: low ({low}) must be below high ({high})")
            params[key] = Param(key, dist, low, high)
        return cls(params)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"dist": p.dist, "low": p.low, "high": p.high} for k, p in self.items()}

    def restrict(self, keys: list[str]) -> Space:
        """Only ``keys`` (in that order).

        Raises:
            ConfigError: for a key not in the space, listing the known ones.
        """
        unknown = [k for k in keys if k not in self._params]
        if unknown:
            raise ConfigError(f"--search {', '.join(unknown)}: not in the search space; "
                              f"known keys: {', '.join(self._params)}")
        return Space({k: self._params[k] for k in keys})

    def sample(self, rng: random.Random) -> dict[str, float]:
        """One configuration (natural values), drawing keys in order."""
        return {k: p.sample(rng) for k, p in self.items()}

    def draw(self, index: int, *, seed: int) -> dict[str, float]:
        """Initialisation ``index``: the same draw as ``bilevel sweep --inits`` makes
        (``numpy.random.default_rng([seed, index])``, keys in order), so trial ``t`` of a
        scheduled sweep starts where initialisation ``t`` of a plain sweep does."""
        rng = np.random.default_rng([seed, index])
        return {k: p.clip(p._from_unit(float(rng.uniform(p.low, p.high))))
                for k, p in self.items()}

    def overrides(self, values: Mapping[str, float]) -> list[str]:
        """``--set`` strings for a configuration."""
        return [f"{k}={float(values[k])!r}" for k in self]

    def __getitem__(self, key: str) -> Param:
        return self._params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def seeded_rng(*parts: int | str) -> random.Random:
    """A ``random.Random`` seeded by a tuple, stable across processes and Python runs."""
    return random.Random("/".join(str(p) for p in parts))
