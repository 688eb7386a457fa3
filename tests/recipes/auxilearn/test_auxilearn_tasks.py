"""auxilearn's task layer: fixed weightings, the unlabelled pool for self-supervised tasks,
the shared hold-out, the image transforms, and the config checks (digits, offline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bilevel.errors import ConfigError, NonFiniteError
from bilevel.recipes import _registry
from bilevel.recipes.auxilearn.tasks import _transform, splits

TINY = """\
recipe: auxilearn
method: stl
data: {name: digits, batch_size: 16}
tasks: {labels_per_class: 6, auxiliary: [parity, rotation, flip], val_size: 100}
model: {name: mlp, hidden: [32]}
inner: {lr: 0.05, momentum: 0.9}
meta: {aux_per_class: 2, every: 2, batch_size: 16, lr: 0.05, hpo_lr: 0.05}
eval_every: 10
run: {seed: 1, max_steps: 20}
logging: {every: 5, tensorboard: false, progress: false}
checkpoint: {every: 10}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def run(config: Path, out: Path, *sets: str) -> dict[str, float]:
    return _registry.start([config], sets, out=out)[1]


def cfg(config: Path, *sets: str) -> Any:
    return _registry.resolve([config], sets)[1]


@pytest.mark.parametrize(("weights", "twin"), [("[0.0,0.0,0.0]", "stl"), ("[1.0,1.0,1.0]", "equal")])
def test_fixed_weighting_is_its_closed_form_twin(tiny: Path, tmp_path: Path, weights: str,
                                                 twin: str) -> None:
    """`fixed` with all-zero weights trains exactly as STL, with all-one weights as equal."""
    fixed = run(tiny, tmp_path / "fixed", "method=fixed", f"tasks.weights={weights}")
    other = run(tiny, tmp_path / "twin", f"method={twin}")
    assert fixed == other
    logged = [json.loads(x) for x in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    w = [r["weight/flip"] for r in logged if "weight/flip" in r]
    assert w and set(w) == {float(weights.strip("[]").split(",")[0])}


def test_unlabelled_pool_is_disjoint_and_leaves_the_other_splits_unchanged(tiny: Path) -> None:
    plain, more = cfg(tiny), cfg(tiny, "tasks.unlabelled=300")
    a, b = splits(plain, torch.device("cpu")), splits(more, torch.device("cpu"))
    for k in ("train", "val", "test"):
        assert all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True))
    x_un = b["unlabelled"]
    assert x_un.shape == (300, 1, 8, 8)
    labelled = a["train"][0].flatten(1)
    # No unlabelled image is one of the labelled images (digits has no exact duplicates here).
    assert not (torch.cdist(x_un.flatten(1), labelled) == 0).any()


def test_unlabelled_run_and_resume(tiny: Path, tmp_path: Path) -> None:
    sets = ("method=linear", "tasks.unlabelled=200")
    full = run(tiny, tmp_path / "full", *sets)
    run(tiny, tmp_path / "part", *sets, "run.max_steps=10")
    resumed = _registry.resume(tmp_path / "part", ["run.max_steps=20"], allow_change=True)[1]
    assert resumed == full


def test_baselines_hold_out_trains_every_arm_on_the_same_labels(tiny: Path) -> None:
    cpu = torch.device("cpu")
    sizes = {}
    for method, hold in (("stl", "false"), ("stl", "true"), ("linear", "false")):
        c = cfg(tiny, f"method={method}", f"tasks.baselines_hold_out={hold}")
        sizes[method, hold] = splits(c, cpu)["train"][1].shape[0]
    assert sizes["stl", "false"] == 60 and sizes["stl", "true"] == sizes["linear", "false"] == 40
    stl = cfg(tiny, "method=stl", "tasks.baselines_hold_out=true")
    lin = cfg(tiny, "method=linear")
    assert torch.equal(splits(stl, cpu)["train"][0], splits(lin, cpu)["train"][0])


def test_transforms() -> None:
    x = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 1, 3, 3)
    for k in range(4):
        code = torch.full((2,), k)
        assert torch.equal(_transform(x, code, "rotation"), torch.rot90(x, k, (2, 3)))
    assert torch.equal(_transform(x, torch.full((2,), 1), "flip"), x.flip(3))
    assert torch.equal(_transform(x, torch.full((2,), 2), "flip"), x.flip(2))
    assert torch.equal(_transform(x, torch.full((2,), 3), "flip"), x.flip(2).flip(3))
    mixed = _transform(x, torch.tensor([0, 1]), "rotation")
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[1], torch.rot90(x[1], 1, (1, 2)))


@pytest.mark.parametrize(("sets", "message"), [
    (["method=fixed"], r"tasks.weights is required by method 'fixed'"),
    (["method=equal", "tasks.weights=[1,1,1]"], r"read by no other method"),
    (["method=fixed", "tasks.weights=[1,1]"], r"one non-negative weight per auxiliary task"),
    (["method=fixed", "tasks.weights=[1,-1,1]"], r"one non-negative weight"),
    (["tasks.auxiliary=[parity]", "tasks.unlabelled=10"], r"add rotation or flip"),
    (["data.name=cifar10"], r"data.name must be one of"),
])
def test_config_errors_name_the_key(tiny: Path, sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(tiny, *sets)


@pytest.mark.parametrize("policy", ["skip", "abort"])
def test_nan_policy(tiny: Path, tmp_path: Path, policy: str) -> None:
    """A diverging run (inner lr 1e30) skips its non-finite updates, logging each, or stops
    with NonFiniteError; rollback (nothing to roll back to) is a config error."""
    sets = ("inner.lr=1e30", f"run.nan_policy={policy}")
    if policy == "abort":
        with pytest.raises(NonFiniteError, match=r"run\.nan_policy=abort"):
            run(tiny, tmp_path / "run", *sets)
        return
    run(tiny, tmp_path / "run", *sets)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"nonfinite"' in x]
    assert events and all(e["action"] == "skip" for e in events)
    with pytest.raises(ConfigError, match=r"run.nan_policy"):
        cfg(tiny, "run.nan_policy=rollback")
