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
