"""RunState: each kind of entry survives a save to bytes and a load into a fresh copy of the
run (continuing bit for bit), tensors come back in place, and a checkpoint of another shape
is refused naming the key. Also RunDir.resume / RunDir.checkpoint with a RunState."""

from __future__ import annotations

import doctest
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bilevel.run.state
from bilevel.data import IndexSampler
from bilevel.errors import CheckpointError
from bilevel.run import Accessor, RunDir, RunState


def _disk(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint gives back: ``torch.save`` then a weights-only load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class Run:
    """A small run holding one entry of every kind; ``advance`` moves all of them."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        self.sampler = IndexSampler(10, 4, seed=1)
        self.gen = torch.Generator().manual_seed(2)
        self.h = torch.zeros(3, requires_grad=True)  # a leaf an optimiser would hold
        self.hs = {"a": torch.zeros(2), "b": torch.ones(1, dtype=torch.float64)}
        self.pair = [torch.zeros(2), torch.zeros((), dtype=torch.int64)]
        self.best = {"step": 0, "val": -1.0, "model": None}
        self.w = {"x": torch.zeros(2)}  # rebound every step: registered through an Accessor
        self.counts = {"skipped": 0}

    def state(self) -> RunState:
        def set_w(w: dict[str, torch.Tensor]) -> None:
            self.w = dict(w)

        return RunState(model=self.model, opt=self.opt, sched=self.sched, sampler=self.sampler,
                        gen=self.gen, h=self.h, hs=self.hs, pair=self.pair, best=self.best,
                        w=Accessor(get=lambda: self.w, set=set_w), absent=None,
                        inner=RunState(counts=self.counts))

    def advance(self, step: int) -> list[torch.Tensor]:
        """One step touching every entry; returns what it computed (to compare runs)."""
        idx = next(self.sampler)
        x = torch.randn(len(idx), 3, generator=self.gen)
        loss = self.model(x + idx[:, None]).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            self.h += loss.detach()
        self.hs["a"] += 1
        self.hs["b"] *= 1.5
        self.pair[0] += x.sum()
        self.pair[1] += 1
        self.best.update(step=step, val=float(loss.detach()), model=dict(self.model.state_dict()))
        self.w = {"x": self.w["x"] + step}
        self.counts["skipped"] += step % 2
        return [loss.detach(), self.h.detach().clone(), self.w["x"], torch.tensor(
            [self.sched.get_last_lr()[0], self.counts["skipped"]], dtype=torch.float64)]


def test_every_kind_resumes_bit_for_bit() -> None:
    whole = Run()
    for step in range(1, 4):
        whole.advance(step)
    saved = _disk(whole.state().state_dict())
    want = [whole.advance(step) for step in range(4, 8)]

    resumed = Run()
    resumed.state().load_state_dict(saved)
    got = [resumed.advance(step) for step in range(4, 8)]
    for a, b in zip(want, got, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert resumed.best["step"] == 7 and resumed.counts == whole.counts


def test_saved_keys_are_the_names_and_none_is_left_out() -> None:
    run = Run()
    state = run.state()
    saved = state.state_dict()
    assert list(saved) == state.names == ["model", "opt", "sched", "sampler", "gen", "h", "hs",
                                          "pair", "best", "w", "inner"]
    assert saved["inner"] == {"counts": {"skipped": 0}}
    assert saved["best"] == run.best and saved["best"] is not run.best  # a shallow copy
    assert isinstance(saved["pair"], list) and isinstance(saved["gen"], torch.Tensor)
    # detached references, as nn.Module.state_dict gives
    assert not saved["h"].requires_grad and saved["h"].data_ptr() == run.h.data_ptr()


def test_tensors_are_restored_in_place() -> None:
    run = Run()
    state = run.state()
    saved = _disk(state.state_dict())
    for step in range(1, 3):
        run.advance(step)
    held = {"h": run.h, "a": run.hs["a"], "p0": run.pair[0], "param": run.opt.param_groups[0]["params"][0]}
    ptrs = {k: v.data_ptr() for k, v in held.items()}
    state.load_state_dict(saved)
    assert run.h is held["h"] and run.hs["a"] is held["a"] and run.pair[0] is held["p0"]
    assert {k: v.data_ptr() for k, v in held.items()} == ptrs
    assert run.h.requires_grad and run.h.is_leaf  # still the leaf the optimiser holds
    assert torch.equal(run.h, torch.zeros(3)) and torch.equal(run.hs["a"], torch.zeros(2))
    assert run.opt.param_groups[0]["params"][0] is next(run.model.parameters())
    assert torch.equal(held["param"], saved["model"]["weight"])
    assert run.best == {"step": 0, "val": -1.0, "model": None} and run.counts["skipped"] == 0


def test_accessor_items_saves_counters_as_top_level_keys() -> None:
    counts = {"rollbacks": 0, "lr_scale": 1.0}
    state = RunState(log=torch.zeros(1), **Accessor.items(counts))
    saved = _disk(state.state_dict())
    assert saved == {"log": saved["log"], "rollbacks": 0, "lr_scale": 1.0}
    counts.update(rollbacks=2, lr_scale=0.25)
    state.load_state_dict(saved)
    assert counts == {"rollbacks": 0, "lr_scale": 1.0}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("sampler"), r"lacks 'sampler'"),
    (lambda s: s.update(combiner={}), r"has unregistered 'combiner'"),
    (lambda s: s.update(absent={}), r"has unregistered 'absent'"),  # None: the key must be absent
    (lambda s: s["hs"].pop("b"), r"'hs' lacks 'hs.b'"),
    (lambda s: s["best"].update(extra=1), r"'best' has unregistered 'best.extra'"),
    (lambda s: s["inner"]["counts"].pop("skipped"), r"'inner.counts' lacks 'inner.counts.skipped'"),
    (lambda s: s.update(h=torch.zeros(4)), r"'h'.*shape \[4\].*shape \[3\]"),
    (lambda s: s["hs"].update(b=torch.ones(1)), r"'hs.b'.*torch.float32.*torch.float64"),
    (lambda s: s.update(pair=s["pair"][:1]), r"'pair': expected a sequence of 2"),
    (lambda s: s.update(hs=torch.zeros(2)), r"'hs': expected a mapping"),
])
def test_a_checkpoint_of_another_shape_is_refused_naming_the_key(edit: Any, message: str) -> None:
    state = Run().state()
    saved = _disk(state.state_dict())
    edit(saved)
    with pytest.raises(CheckpointError, match=message):
        state.load_state_dict(saved)


def test_keys_are_checked_before_anything_is_restored() -> None:
    a, b = torch.zeros(1), {"n": 0}
    state = RunState(a=a, b=b)
    with pytest.raises(CheckpointError, match=r"lacks 'b' and has unregistered 'c'"):
        state.load_state_dict({"a": torch.ones(1), "c": {"n": 1}})
    assert torch.equal(a, torch.zeros(1))


@pytest.mark.parametrize(("value", "message"), [
    (3, r"'t' \(int\) cannot be restored in place.*Accessor"),
    ("x", r"'t' \(str\)"),
    ((1, 2), r"'t' \(tuple\)"),
    ({"s": IndexSampler(4, 2, seed=0), "n": 1}, r"'t' mixes objects \(t.s\)"),
])
def test_entries_that_cannot_be_restored_are_refused_at_registration(value: Any,
                                                                    message: str) -> None:
    with pytest.raises(TypeError, match=message):
        RunState(t=value)


def test_module_example() -> None:
    result = doctest.testmod(bilevel.run.state)
    assert result.attempted > 0 and result.failed == 0


# -- with a run directory ---------------------------------------------------------------------


def _run_dir(path: Path, every: int = 2) -> RunDir:
    return RunDir.create(path, {"checkpoint": {"every": every, "keep_last": 5},
                                "logging": {"tensorboard": False, "progress": False}},
                         recipe="test")


def test_resume_is_zero_when_fresh_and_the_checkpoint_step_after(tmp_path: Path) -> None:
    w, reads = torch.zeros(2), []
    state = RunState(w=w, seen=Accessor(get=lambda: reads.append(1) or len(reads),
                                        set=lambda n: None))
    with _run_dir(tmp_path / "run") as run_dir:
        assert run_dir.resume(state) == 0
        assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
        for step in run_dir.steps(0, 5):
            w += step
            run_dir.checkpoint(step, state)
        assert len(reads) == 2  # read only when a save was due (steps 2 and 4)

    w.zero_()
    with RunDir.open(tmp_path / "run") as run_dir:
        assert run_dir.resume(state) == 4
    assert torch.equal(w, torch.full((2,), 10.0))  # 1 + 2 + 3 + 4, in place


def test_resume_save_start_checkpoints_step_0_of_a_fresh_run(tmp_path: Path) -> None:
    w = torch.ones(1)
    with _run_dir(tmp_path / "run", every=100) as run_dir:
        assert run_dir.resume(RunState(w=w), save_start=True) == 0
    w += 1
    with RunDir.open(tmp_path / "run") as run_dir:
        assert run_dir.resume(RunState(w=w), save_start=True) == 0
    assert torch.equal(w, torch.ones(1))


def test_resume_refuses_a_checkpoint_of_other_entries(tmp_path: Path) -> None:
    with _run_dir(tmp_path / "run") as run_dir:
        run_dir.checkpoint(2, RunState(w=torch.zeros(1), sampler=IndexSampler(4, 2, seed=0)))
    with RunDir.open(tmp_path / "run") as run_dir, \
            pytest.raises(CheckpointError, match="has unregistered 'sampler'"):
        run_dir.resume(RunState(w=torch.zeros(1)))
