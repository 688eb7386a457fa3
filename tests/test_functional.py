"""bilevel.functional.call: modules as pure functions, including shared and tied submodules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel.functional import call, module_state


def test_call_with_a_submodule_reached_twice_leaves_the_module_intact():
    """torch 2.13's functional_call restores a slot given under two names in the wrong order;
    functional.call must leave the model's own Parameters in place and still use the given
    tensors for both paths, and keep weights tied across different modules tied."""
    lin = nn.Linear(3, 3)
    model = nn.Module()
    model.a, model.b = lin, lin
    model.forward = lambda x: model.b(model.a(x))
    before = lin.weight
    params, buffers = module_state(model)
    doubled = {k: v * 2 for k, v in params.items()}
    x = torch.randn(2, 3)
    out, _ = call(model, doubled, buffers, x)
    expect = torch.nn.functional.linear(torch.nn.functional.linear(x, doubled["a.weight"], doubled["a.bias"]),
                                        doubled["a.weight"], doubled["a.bias"])
    assert torch.allclose(out, expect)
    assert lin.weight is before and isinstance(lin.weight, nn.Parameter)

    emb, dec = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    dec.weight = emb.weight  # tied across modules
    tied = nn.Module()
    tied.emb, tied.dec, tied.again = emb, dec, emb
    tied.forward = lambda x: tied.dec(tied.emb(x))
    p, b = module_state(tied)
    assert list(p) == ["emb.weight"]
    out, _ = call(tied, {"emb.weight": p["emb.weight"] * 3}, b, x)
    w = p["emb.weight"] * 3
    assert torch.allclose(out, x @ w.T @ w.T) and isinstance(dec.weight, nn.Parameter)
    with pytest.raises(ValueError, match="missing tensors"):
        call(tied, {}, b, x)


def test_call_checks_names_itself_and_keeps_tied_weights_tied():
    """The common path (no submodule reached twice) skips functional_call's own per-call
    checks: the names are compared with the model's once-found layout instead, tied weights
    still follow the tensor given for them, and a wrong name still gets torch's error."""
    emb, dec = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    dec.weight = emb.weight  # tied across modules, no submodule shared
    model = nn.Sequential(emb, nn.BatchNorm1d(3), dec)
    p, b = module_state(model)
    assert list(p) == ["0.weight", "1.weight", "1.bias"]
    x = torch.randn(4, 3)
    w = p["0.weight"] * 3
    out, new_b = call(model, {**p, "0.weight": w}, b, x)
    h = torch.nn.functional.batch_norm(x @ w.T, None, None, p["1.weight"], p["1.bias"], training=True)
    assert torch.allclose(out, h @ w.T, atol=1e-6)
    assert not torch.equal(new_b["1.running_mean"], b["1.running_mean"])  # a clone advanced
    assert torch.equal(b["1.running_mean"], torch.zeros(3))  # the caller's copy untouched
    assert isinstance(dec.weight, nn.Parameter) and dec.weight is emb.weight
    with pytest.raises(RuntimeError, match=r"1\.bias"):  # missing
        call(model, {k: v for k, v in p.items() if k != "1.bias"}, b, x)
    with pytest.raises(RuntimeError, match="extra"):  # unexpected
        call(model, {**p, "extra": torch.zeros(1)}, b, x)
    with pytest.raises(RuntimeError, match=r"1\.running_mean"):  # buffers are required too
        call(model, p, {}, x)
