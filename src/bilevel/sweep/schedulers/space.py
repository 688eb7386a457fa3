"""A search space: config keys and the distribution each is drawn from.

One description serves every engine. It is the dict form the recipes publish (e.g.
``bilevel.recipes.onepass.SEARCH_SPACE``, Clarke et al.'s ranges, seeds.md §3.4)::

    {"inner.lr": {"dist": "log10_uniform", "low": -6.0, "high": -1.0},   # 10^U(-6, -1)
     "inner.momentum": {"dist": "uniform", "low": 0.0, "high": 1.0}}

``log10_uniform`` bounds are exponents; every value handed to a config is a *natural* value
(``inner.lr = 10^x``). Values are kept strictly inside ``(low, high)`` by a margin of
``1e-6`` of the width, because recipes validate open intervals (momentum < 1, as Clarke
et al. clip it to ``1 - 1e-6``). The engines translate a :class:`Space` with
:meth:`Param.to_optuna` and :meth:`Param.to_ray`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bilevel.errors import ConfigError

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
