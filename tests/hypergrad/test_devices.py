"""Device slips: no tensor created without the device of its inputs.

Two checks, because no GPU is needed to run either:

* The engine's contract problem on the ``meta`` device (shapes and dtypes, no data): a tensor
  created on the CPU and mixed with meta tensors raises. Methods that read host values
  (``float(...)`` on series norms and residuals, for their convergence diagnostics, and the
  NaN checks) cannot run on meta; they run here with ``check_finite=False`` where that is
  enough, and the others are covered by the second check.
* Every method on the CPU under a torch function mode that fails when bilevel's own code
  calls a tensor factory (``torch.zeros``, ``torch.tensor``, ...) without ``device=``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import bilevel
from bilevel import hypergrad
from bilevel.meta.hparams import HParamSpec, Hyperparameters

from . import test_contract as C

# Implicit methods at a state that is not a fixed point, a few iterations: expected warnings.
pytestmark = pytest.mark.filterwarnings("ignore::bilevel.errors.HypergradWarning")

META = torch.device("meta")
PACKAGE = str(Path(bilevel.__file__).parent)
FACTORIES = {"zeros", "ones", "full", "empty", "tensor", "eye", "arange", "linspace", "rand",
             "randn", "randint", "randperm", "scalar_tensor"}


def _on_meta(monkeypatch):
    for name in ("XT", "YT", "XV", "YV", "WD"):
        monkeypatch.setattr(C, name, getattr(C, name).to(META))
    s = {k: v.to(META) for k, v in C.state0().items()}
    h = {k: v.detach().to(META).requires_grad_() for k, v in C.hparams().items()}
    return s, h


def step_with_counter(s, h, t):
    """The contract step plus a float leaf with no graph (like BatchNorm running stats)."""
    new = C.step({"w": s["w"], "b": s["b"]}, h, t)
    return {**new, "n": s["n"].detach() + 1}


NO_SYNC = {
    "unrolled": lambda s, h: hypergrad.unrolled(C.step, C.outer, s, h, steps=3, check_finite=False),
    "truncated": lambda s, h: hypergrad.unrolled(C.step, C.outer, s, h, steps=3, truncate=1,
                                                 check_finite=False),
    "checkpointed": lambda s, h: hypergrad.unrolled(C.step, C.outer, s, h, steps=3,
                                                    checkpoint=True, check_finite=False),
    "forward": lambda s, h: hypergrad.forward(C.step, C.outer, s, {"log_lr": h["log_lr"]},
                                              steps=3, check_finite=False),
    "identity": lambda s, h: hypergrad.implicit(C.step, C.outer, s, h, solver="identity",
                                                check_finite=False),
    "exact": lambda s, h: hypergrad.implicit(
        step_with_counter, C.outer, {**s, "n": torch.zeros((), device=s["w"].device)},
        {"log_lr": h["log_lr"]}, solver="exact", check_finite=False),
    "greedy": lambda s, h: hypergrad.greedy(C.step, C.outer, s, h, check_finite=False),
}


@pytest.mark.parametrize("name", list(NO_SYNC))
def test_contract_on_meta_device(name, monkeypatch):
    s, h = _on_meta(monkeypatch)
    r = NO_SYNC[name](s, h)
    for k, g in r.hypergrad.items():
        assert g.device == META and g.shape == h[k].shape and g.dtype == h[k].dtype, k
    assert all(v.device == META for v in r.state.values())
    assert r.outer_loss.device == META


class FactoryWatch(TorchFunctionMode):
    """Records tensor factories called from bilevel's own code without ``device=``."""

    def __init__(self) -> None:
        super().__init__()
        self.slips: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and "device" not in kwargs:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                self.slips.append(f"torch.{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **kwargs)


def _watched(fn):
    @functools.wraps(fn)
    def run(*args):
        with FactoryWatch() as watch:
            out = fn(*args)
        assert not watch.slips, f"tensors created without device=: {watch.slips}"
        return out
    return run


@pytest.mark.parametrize("name", list(C.METHODS))
def test_no_factory_without_device(name):
    _watched(C.METHODS[name])(C.state0(), C.hparams())


def test_no_factory_without_device_exact_with_graphless_leaf():
    s, h = C.state0(), C.hparams()
    _watched(NO_SYNC["exact"])(s, h)


def test_watch_catches_a_slip():
    """The watch itself: a factory without device in bilevel's code is reported."""
    from bilevel.tree import tree_dot
    with pytest.raises(AssertionError, match="without device"):
        _watched(tree_dot)({}, {})  # an empty tree has no device to take


def test_hparams_summary_keeps_the_device():
    like = {"w": torch.randn(4, 3)}
    hp = Hyperparameters({"lr": HParamSpec(init=0.1, transform="log10", granularity="element")},
                         like=like)
    out = _watched(hp.summary)()
    assert out["lr_q50"] == pytest.approx(0.1, rel=1e-5)
