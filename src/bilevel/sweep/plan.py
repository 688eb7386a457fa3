"""A sweep's plan: which runs exist (variant × initialisation), with which configs, where.

Layout of a sweep directory::

    OUT/sweep.json                  the plan (configs, variants, space, seed, inits)
    OUT/<variant>/init-<i:04d>/     one run directory per (variant, initialisation)

Every variant of initialisation ``i`` gets the same drawn values and the same ``run.seed``
(``seed + i``, hence the same initial weights): the algorithms are compared on paired runs.
The plan is written once; calling the sweep again with the same configs continues it, and
asking for more initialisations extends it (draws are per index, see :mod:`.space`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bilevel.errors import ConfigError
from bilevel.sweep.space import SpaceDict, check_space, overrides, sample


@dataclass(frozen=True)
class Trial:
    """One run of a sweep: configs (layered in order) plus ``--set`` overrides."""

    variant: str
    index: int
    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    path: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What a sweep runs; :meth:`trials` expands it."""

    base: tuple[str, ...]
    variants: dict[str, str | None]  # label -> algorithm config (None: base only)
    space: dict[str, dict[str, Any]]
    inits: int
    seed: int = 0
    overrides: tuple[str, ...] = ()

    def trials(self, out: Path) -> list[Trial]:
        """Every (initialisation, variant) pair, initialisation-major (so partial sweeps
        have all algorithms on the first inits)."""
        out_trials = []
        for i in range(self.inits):
            drawn = sample(self.space, i, seed=self.seed)
            for label, algo in self.variants.items():
                configs = (*self.base, *([algo] if algo else []))
                sets = (*self.overrides, *overrides(drawn), f"run.seed={self.seed + i}")
                out_trials.append(Trial(label, i, configs, sets,
                                        str(out / label / f"init-{i:04d}"), drawn))
        return out_trials

    def compatible(self, other: Plan) -> list[str]:
        """Differences (other than the number of inits) that forbid continuing ``other``.

        Config files are compared by content, not path: a sweep started from one checkout
        (or before the project moved) continues from another with the same configs."""
        mine, theirs = asdict(self), asdict(other)
        diff = [k for k in mine if k not in ("inits", "base", "variants")
                and _norm(mine[k]) != _norm(theirs[k])]
        if not _same_files(self.base, other.base):
            diff.append("base")
        if (list(self.variants) != list(other.variants)
                or not _same_files(tuple(self.variants.values()), tuple(other.variants.values()))):
            diff.append("variants")
        return diff


def _norm(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _same_files(a: Sequence[str | None], b: Sequence[str | None]) -> bool:
    def same(x: str | None, y: str | None) -> bool:
        if x == y:
            return True
        if x is None or y is None:
            return False
        px, py = Path(x), Path(y)
        return px.is_file() and py.is_file() and px.read_bytes() == py.read_bytes()
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def variant_labels(algorithms: Sequence[str]) -> dict[str, str | None]:
    """Label each algorithm config by its file stem; ``{"run": None}`` when there are none."""
    if not algorithms:
        return {"run": None}
    labels: dict[str, str | None] = {}
    for a in algorithms:
        label = Path(a).stem
        if label in labels:
            raise ConfigError(f"two algorithm configs are both labelled {label!r}: rename one")
        labels[label] = a
    return labels


def load_or_write(out: Path, plan: Plan) -> Plan:
    """Write ``OUT/sweep.json``, or check the existing one agrees (a larger ``inits`` wins)."""
    path = out / "sweep.json"
    if path.exists():
        old = plan_from_json(json.loads(path.read_text()))
        diff = plan.compatible(old)
        if diff:
            raise ConfigError(f"{path} was written by a different sweep (differs in "
                              f"{', '.join(diff)}); use another --out or the same arguments")
        if old.inits >= plan.inits and _norm(asdict(old)) == _norm(asdict(replace(plan, inits=old.inits))):
            return old
        plan = replace(plan, inits=max(old.inits, plan.inits))  # this checkout's paths
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(plan), indent=1))
    tmp.replace(path)
    return plan


def plan_from_json(data: Mapping[str, Any]) -> Plan:
    space = {k: dict(v) for k, v in data["space"].items()}
    check_space(space)
    return Plan(tuple(data["base"]), dict(data["variants"]), space, int(data["inits"]),
                int(data.get("seed", 0)), tuple(data.get("overrides", ())))


def default_space(recipe_module: Any) -> SpaceDict:
    """The recipe's ``SEARCH_SPACE`` (empty if it has none)."""
    return dict(getattr(recipe_module, "SEARCH_SPACE", {}) or {})
