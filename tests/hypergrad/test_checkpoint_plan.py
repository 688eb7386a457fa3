"""How checkpointed unrolls size their segments: sqrt(T · state bytes / bytes per step)."""

from __future__ import annotations

import sys

import pytest
import torch

from bilevel import hypergrad
from bilevel.hypergrad._checkpoint import graph_bytes, segment_length

from .problems import Ridge


def test_graph_bytes_counts_each_saved_tensor_once():
    w = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1000, dtype=torch.float64)
    y = (x * w) * w  # saves x and w (first mul), x*w and w (second): w counted once
    assert graph_bytes([y]) == 3 * 1000 * 8
    assert graph_bytes([torch.ones(3)]) == 0


@pytest.mark.parametrize(("steps", "state", "step_bytes", "want"),
                         [(100, 1, 1, 10), (20, 1, 100, 1), (100, 4, 1, 20), (5, 100, 1, 5)])
def test_segment_length(steps, state, step_bytes, want):
    assert segment_length(steps, state, step_bytes) == want


def test_large_activations_give_short_segments():
    """A step whose graph keeps 64x its state gets segments of ~sqrt(T/64): here 1."""
    ridge = Ridge()
    calls: list[int] = []
    mod = sys.modules["bilevel.hypergrad._checkpoint"]

    def step(s, h, t):
        big = s["w"].expand(64, -1) * torch.exp(h["log_reg"])  # saved by the next op
        return {"w": ridge.step(s, h, t)["w"] + 0.0 * (big * big).mean(0)}

    orig = mod.checkpointed_segment

    def spy(run, state, hparams, plan):
        calls.append(1)
        return orig(run, state, hparams, plan)

    try:
        sys.modules["bilevel.hypergrad.unrolled"].checkpointed_segment = spy
        r = hypergrad.unrolled(step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=20,
                               checkpoint=True)
    finally:
        sys.modules["bilevel.hypergrad.unrolled"].checkpointed_segment = orig
    assert len(calls) == 20  # segments of one step
    plain = hypergrad.unrolled(step, ridge.outer_loss, ridge.state0(), ridge.hparams(), steps=20)
    assert float(r.hypergrad["log_reg"]) == pytest.approx(float(plain.hypergrad["log_reg"]), rel=1e-12)
    assert r.info["segment"] == 1


def test_leaves_returned_unchanged_do_not_count_as_state():
    """A state leaf the step passes through (a momentum buffer without momentum, a frozen
    table) is shared by every saved state, so it must not lengthen the segments: the plan
    is the one for the changing leaves alone."""
    ridge = Ridge()

    def step(s, h, t):
        return {"w": ridge.step(s, h, t)["w"], "frozen": s["frozen"]}

    def outer(s, h):
        return ridge.outer_loss(s, h)

    alone = hypergrad.unrolled(ridge.step, ridge.outer_loss, ridge.state0(), ridge.hparams(),
                               steps=64, checkpoint=True)
    s0 = {**ridge.state0(), "frozen": torch.zeros(50 * ridge.state0()["w"].numel(), dtype=torch.float64)}
    with_frozen = hypergrad.unrolled(step, outer, s0, ridge.hparams(), steps=64, checkpoint=True)
    assert with_frozen.info["segment"] == alone.info["segment"]
    assert float(with_frozen.hypergrad["log_reg"]) == float(alone.hypergrad["log_reg"])
