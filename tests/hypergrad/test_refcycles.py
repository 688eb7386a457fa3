"""Memory must not depend on when Python's cycle collector runs: with the collector off,
every tensor a step made is freed by reference counting alone once the engine returns.

A reference cycle through the engine (e.g. a self-recursive closure in tree_flatten that
holds the flattened leaves) keeps a step's tensors, and a checkpointed segment's recomputed
graph, alive until ``gc.collect()``; these tests fail when one comes back.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from torch.func import grad

from bilevel import hypergrad
from bilevel.tree import tree_flatten, tree_map, tree_unflatten

# Implicit methods at a state that is not a fixed point, a few iterations: expected warnings.
pytestmark = pytest.mark.filterwarnings("ignore::bilevel.errors.HypergradWarning")

G = torch.Generator().manual_seed(0)
X = torch.randn(64, 20, generator=G, dtype=torch.float64)
Y = torch.randn(64, generator=G, dtype=torch.float64)
W_STAR = torch.randn(20, generator=G, dtype=torch.float64)


def train_loss(w, h):
    return ((X @ w - Y) ** 2).mean() + torch.exp(h["l"]) * (w * w).sum()


def outer(s, h):
    return ((s["w"] - W_STAR) ** 2).sum()


def make_step(refs: list, style: str):
    def step(s, h, t):
        if style == "func":
            g = grad(train_loss)(s["w"], h)
        else:
            w = s["w"] if s["w"].requires_grad else s["w"].detach().requires_grad_()
            (g,) = torch.autograd.grad(train_loss(w, h), w, create_graph=True)
        new = s["w"] - 0.1 * g
        big = new.expand(1000, -1) * 1.0
        out = new + 0.0 * (big * big).mean(0)  # the graph of ``out`` saves ``big``
        refs.extend(weakref.ref(x) for x in (g, new, big, out))
        return {"w": out}
    return step


CALLS = {
    "unrolled": lambda st, s, h: hypergrad.unrolled(st, outer, s, h, steps=9),
    "checkpointed": lambda st, s, h: hypergrad.unrolled(st, outer, s, h, steps=9, checkpoint=True),
    "truncated": lambda st, s, h: hypergrad.unrolled(st, outer, s, h, steps=9, truncate=3),
    "neumann": lambda st, s, h: hypergrad.implicit(st, outer, s, h, terms=4),
    "cg": lambda st, s, h: hypergrad.implicit(st, outer, s, h, solver="cg", iters=3),
    "one_pass": lambda st, s, h: hypergrad.one_pass(st, outer, s, h, terms=3),
}


@contextlib.contextmanager
def collector_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("style", ["func", "autograd"])
@pytest.mark.parametrize("name", list(CALLS))
def test_step_tensors_freed_without_cycle_collector(name, style):
    refs: list = []
    step = make_step(refs, style)
    s = {"w": 0.5 * W_STAR}
    h = {"l": torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)}
    CALLS[name](step, s, h)  # warm up: PyTorch's first calls import modules that form cycles
    refs.clear()
    with collector_off():
        r = CALLS[name](step, s, h)
        assert torch.isfinite(r.hypergrad["l"]) and float(r.hypergrad["l"]) != 0.0
        del r
        alive = sum(ref() is not None for ref in refs)
    assert refs, "the step was never called"
    assert alive == 0, f"{alive} of {len(refs)} step tensors are kept alive by a reference cycle"


def test_flatten_unflatten_make_no_cycles():
    tree = {"a": [torch.ones(3), (torch.zeros(2), None)], "b": {"c": torch.ones(1)}}
    with collector_off():
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            leaves, d = tree_flatten(tree)
            out = tree_unflatten(d, leaves)
            tree_map(torch.neg, out)
            del leaves, d, out
            found = gc.collect()
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert found == 0
