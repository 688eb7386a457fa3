"""No config key is read and ignored: every field of every recipe's config must be read while
the config is validated or the recipe runs.

Each recipe runs tiny settings in process while attribute reads of config sections are
recorded (``model_dump()`` of a section counts as reading all of it: the recipe then passes
the whole section on). A field that no setting reads is a key the recipe accepts and
ignores, which a user cannot tell from a typo-free config that silently does nothing.

``CONDITIONAL`` lists fields read only on a path a tiny run does not take (a non-finite
value, an architecture not run here) with the test that exercises that path. ``IGNORED``
lists the keys known to be accepted and ignored today (per-method hypergradient sections
removed the ``hypergrad.*`` ones; per-recipe optimiser/model sections would remove the rest);
it may only shrink: a key that is read again fails the test until it is removed from the list.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from bilevel.data import fetch_dataset
from bilevel.recipes import _registry
from bilevel.run import RunDir
from bilevel.run.schema import Section
from tests.conftest import shared_data_dir

NAN = "run.nan_policy"  # read when a non-finite value appears (tests/cli/test_cli_nan*.py)

CONDITIONAL: dict[str, set[str]] = {
    "onepass": {"model.embedding_dim", "model.hidden_size", "model.num_layers",  # lstm only
                "run.max_steps"},  # read when algorithm.hyper_steps is unset (the shipped configs)
    "auxilearn": {NAN},  # tests/recipes/auxilearn/test_auxilearn_tasks.py::test_nan_policy
    "toy_hyperlr": {NAN},
    "commentaries_weighting": {NAN},
    "commentaries_blending": {NAN},
    "alig": {NAN},  # tests/recipes/alig/test_alig.py::test_divergence_stops_or_aborts_by_nan_policy
    "gtn": {NAN},  # tests/recipes/gtn/test_gtn_cli.py::test_nan_policy
    "auxilearn_labels": {NAN},  # tests/recipes/auxilearn/test_auxilearn_labels.py::test_nan_policy
}

IGNORED: dict[str, set[str]] = {}
FRAMEWORK = ("checkpoint.", "logging.")  # read by RunDir from the resolved config


@contextmanager
def recording() -> Iterator[set[tuple[int, str]]]:
    """Record ``(id(section), field)`` for every field read of every config section."""
    seen: set[tuple[int, str]] = set()
    get, dump = Section.__getattribute__, Section.model_dump

    def getattribute(self: Section, name: str) -> Any:
        if name in type(self).model_fields:
            seen.add((id(self), name))
        return get(self, name)

    def model_dump(self: Section, *args: Any, **kwargs: Any) -> Any:
        seen.update((id(self), n) for n in type(self).model_fields)
        return dump(self, *args, **kwargs)

    Section.__getattribute__ = getattribute  # type: ignore[method-assign]
    Section.model_dump = model_dump  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        Section.__getattribute__ = get  # type: ignore[method-assign]
        Section.model_dump = dump  # type: ignore[method-assign]


def _fixed(model: BaseModel, prefix: str = "") -> set[str]:
    """Fields that admit one value (``Literal["sgd"]``, a method's ``method`` tag): validation
    refuses any other, so they cannot be set and ignored."""
    out = set()
    for name, field in type(model).model_fields.items():
        if get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
            out.add(prefix + name)
        value = object.__getattribute__(model, name)
        if isinstance(value, BaseModel):
            out |= _fixed(value, f"{prefix}{name}.")
    return out


def _paths(model: BaseModel, prefix: str = "") -> dict[tuple[int, str], str]:
    out = {}
    for name in type(model).model_fields:
        value = object.__getattribute__(model, name)
        out[id(model), name] = prefix + name
        if isinstance(value, BaseModel):
            out |= _paths(value, f"{prefix}{name}.")
    return out


def unread(files: list[Path | str], sets: list[str], out: Path) -> set[str]:
    """Leaf fields of the resolved config that neither validation nor the run read."""
    with recording() as seen:
        name, config, resolved = _registry.resolve(files, sets)
        table = _paths(config)
        run_dir = RunDir.create(out, {k: v for k, v in resolved.items() if k != "recipe"},
                                recipe=name)
        _registry._execute(run_dir, config)
    read = {table[k] for k in seen if k in table} | _fixed(config)
    leaves = {p for p in table.values() if not any(q.startswith(p + ".") for q in table.values())}
    return {p for p in leaves - read if not p.startswith(FRAMEWORK)}


def _settings(tmp: Path) -> dict[str, list[tuple[list[Path | str], list[str]]]]:
    from tests.cli.conftest import TINY as TOY
    from tests.cli.test_cli_mnist_lr import TINY as MNIST_LR
    from tests.recipes.alig.test_alig import SGD as ALIG_SGD
    from tests.recipes.alig.test_alig import TINY as ALIG
    from tests.recipes.auxilearn.test_auxilearn_cli import TINY as AUX
    from tests.recipes.auxilearn.test_auxilearn_labels import TINY as AUX_LABELS
    from tests.recipes.commentaries.test_commentaries_cli import BLENDING, WEIGHTING
    from tests.recipes.gtn.test_gtn_cli import TINY as GTN
    from tests.recipes.mnist_schedule.test_mnist_schedule_cli import TINY as SCHEDULE
    from tests.recipes.onepass.test_onepass_cli import ALGOS

    def write(name: str, text: str) -> list[Path | str]:
        (tmp / name).write_text(text)
        return [tmp / name]

    def argv(args: list[str]) -> tuple[list[Path | str], list[str]]:
        return [args[0]], [v for k, v in pairwise(args) if k == "--set"]

    onepass = []
    for algo in ALGOS:
        steps = (["algorithm.weight_steps=1"] if algo.startswith("baydin") else
                 ["algorithm.weight_steps=4", "algorithm.lookback=4"]
                 if "diff_through_opt" in algo else [])
        onepass.append((["onepass/uci_energy.yaml", f"onepass/{algo}.yaml"],
                        ["algorithm.hyper_steps=2", "inner.lr=0.01", *steps]))
    return {
        "auxilearn": [(write(f"aux-{m}.yaml", AUX.format(method=m)), [])
                      for m in ("stl", "equal", "linear", "nonlinear")]
        + [(write("aux-fixed.yaml", AUX.format(method="fixed")),
            ["tasks.weights=[0.5,0.5,0.5]", "tasks.unlabelled=100",
             "tasks.baselines_hold_out=true"])],
        "auxilearn_labels": [(write(f"al-{v}.yaml", AUX_LABELS.replace("LEARN", v)), [])
                             for v in ("true", "false")],
        "gtn": [(write(f"gtn-{c}-{m}.yaml", GTN.format(curriculum=c, method=m, steps=2)), [])
                for c, m in (("learned", "checkpointed"), ("random", "unrolled"),
                             ("random_fixed", "unrolled"))],
        "commentaries_weighting": [
            (write(f"cw-{m}.yaml", WEIGHTING.replace("HGMETHOD", m)), ["run.max_steps=1"])
            for m in ("unrolled", "checkpointed")],
        "commentaries_blending": [(write("cb.yaml", BLENDING), ["run.max_steps=2"])],
        "alig": [(write("alig.yaml", ALIG), ["run.max_steps=10"]),
                 (write("sgd.yaml", ALIG_SGD), ["run.max_steps=10"])],
        "toy_hyperlr": [(write("toy.yaml", TOY), ["run.max_steps=4"])],
        "mnist_lr": [argv(MNIST_LR)],
        "mnist_schedule": [argv(SCHEDULE)],
        "onepass": onepass,
    }


def _settings_of(recipe: str, tmp: Path) -> list[tuple[list[Path | str], list[str]]]:
    """The tiny settings above, or, for a recipe not listed (a new folder needs no edit here),
    each of its shipped configs for two steps."""
    listed = _settings(tmp)
    if recipe in listed:
        return listed[recipe]
    return [([path], ["run.max_steps=2"]) for path in sorted(_registry.config_dir(recipe).glob("*.yaml"))]


@pytest.fixture(scope="module")
def uci_energy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    data = tmp_path_factory.mktemp("data")
    fetch_dataset("uci_energy", data, from_dir=shared_data_dir())
    old = os.environ.get("BILEVEL_DATA")
    os.environ["BILEVEL_DATA"] = str(data)
    yield
    if old is None:
        os.environ.pop("BILEVEL_DATA")
    else:
        os.environ["BILEVEL_DATA"] = old


def test_every_recipe_is_covered(tmp_path: Path) -> None:
    assert all(_settings_of(name, tmp_path) for name in _registry.names())
    assert set(_settings(tmp_path)) <= set(_registry.names())  # no stale entry


@pytest.mark.parametrize("recipe", sorted(_registry.names()))
def test_no_recipe_reads_and_ignores_a_key(recipe: str, tmp_path: Path, uci_energy: None) -> None:
    never: set[str] | None = None
    for i, (files, sets) in enumerate(_settings_of(recipe, tmp_path)):
        u = unread(files, sets, tmp_path / f"run-{i}")
        never = u if never is None else never & u
    assert never is not None
    ignored = never - CONDITIONAL.get(recipe, set())
    known = IGNORED.get(recipe, set())
    assert ignored <= known, f"{recipe} accepts and ignores {sorted(ignored - known)}"
    assert known <= ignored, (f"{recipe} now reads {sorted(known - ignored)}: remove them "
                              "from IGNORED")
