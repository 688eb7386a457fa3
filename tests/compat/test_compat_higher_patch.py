"""Patched modules of bilevel.compat.higher: forward parity, buffers, fast-weight history.

Covers what code written for ``higher`` relies on: ``fmodel(x)`` equals ``model(x)``,
``fmodel(x, params=...)``, submodule and method calls on fast weights,
``parameters(time=t)``, ``copy_initial_weights`` and ``track_higher_grads`` semantics,
BatchNorm statistics that advance only in the patched copy and come back through
``model.load_state_dict(fmodel.state_dict())``, and a module left exactly as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bilevel.compat.higher as higher


class Shared(nn.Module):
    """One Linear reached under two names (a shared submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(3, 3))
        self.b = nn.Sequential(self.a[0], nn.Tanh())

    def forward(self, x):
        return self.a(x) + self.b(x)

    def encode(self, x):
        return self.b(x) * 2


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)
    ).double()


def _data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, generator=g, dtype=torch.float64),
         torch.randn(16, 2, generator=g, dtype=torch.float64))
        for _ in range(n)
    ]


def _snapshot(model: nn.Module):
    return {k: (type(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def test_forward_submodules_and_methods_match_the_module():
    torch.manual_seed(0)
    model = Shared().double()
    before = _snapshot(model)
    fmodel = higher.monkeypatch(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(fmodel(x), model(x))
    assert torch.equal(fmodel.b(x), model.b(x))
    assert torch.equal(fmodel.encode(x), model.encode(x))
    assert len(list(fmodel.parameters())) == 2  # the shared Linear counts once
    # new fast weights reach every name of the shared Linear
    w, bias = (torch.zeros_like(p) for p in fmodel.parameters())
    assert torch.equal(fmodel(x, params=[w, bias]), torch.tanh(torch.zeros(4, 3, dtype=torch.float64)))
    assert fmodel.a[0].weight is w and fmodel.b[0].weight is w
    # the module is untouched: still Parameters, same values
    after = _snapshot(model)
    for k, (cls, v) in before.items():
        assert after[k][0] is cls and torch.equal(after[k][1], v)


def test_params_keyword_and_manual_unroll_match_plain_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    fmodel = higher.monkeypatch(model)
    (x, _), (xv, _) = _data(2)
    params = list(fmodel.parameters())
    for _ in range(3):
        grads = torch.autograd.grad(fmodel(x, params=params).pow(2).sum(), params, create_graph=True)
        params = [p - 0.1 * g for p, g in zip(params, grads, strict=True)]
    loss = fmodel(xv, params=params).pow(2).sum()
    ours = torch.autograd.grad(loss, list(fmodel.parameters(time=0)))

    w0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ws = w0
    for _ in range(3):
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], ws, strict=True)), (x,))
        gs = torch.autograd.grad(out.pow(2).sum(), ws, create_graph=True)
        ws = [w - 0.1 * g for w, g in zip(ws, gs, strict=True)]
    out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], ws, strict=True)), (xv,))
    ref = torch.autograd.grad(out.pow(2).sum(), w0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # parameters(time=t) is the t-th list given
    assert len([fmodel.parameters(time=t) for t in range(4)]) == 4


def test_copy_initial_weights_true_stops_at_copies_false_reaches_the_model():
    data = _data(4)
    for copy_initial in (True, False):
        model = _bn_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=copy_initial) as (fmodel, diffopt):
            for x, y in data[:-1]:
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            meta = ((fmodel(data[-1][0]) - data[-1][1]) ** 2).mean()
            at_zero = torch.autograd.grad(meta, list(fmodel.parameters(time=0)), retain_graph=True)
            meta.backward()
        if copy_initial:
            assert all(p.grad is None for p in model.parameters())
            assert all(p.is_leaf for p in fmodel.parameters(time=0))
        else:  # MAML: the outer gradient lands in model.parameters()
            for p, g in zip(model.parameters(), at_zero, strict=True):
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_initial_weight_gradient_matches_finite_differences():
    data = _data(4)

    def meta_loss(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for x, y in data[:-1]:
                diffopt.step(((fmodel(x) - y) ** 2).mean())
            return ((fmodel(data[-1][0]) - data[-1][1]) ** 2).mean()

    model = _bn_net()
    meta_loss(model).backward()
    w = model[0].weight
    eps = 1e-6
    for idx in [(0, 0), (3, 2), (5, 1)]:
        shifted = []
        for sign in (1, -1):
            other = copy.deepcopy(model)
            with torch.no_grad():
                other[0].weight[idx] += sign * eps
            shifted.append(float(meta_loss(other).detach()))
        fd = (shifted[0] - shifted[1]) / (2 * eps)
        assert float(w.grad[idx]) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_track_higher_grads_false_keeps_one_detached_copy():
    data = _data(6)
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    tracked = higher.innerloop_ctx(model, opt)
    free = higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False)
    with tracked as (fa, da), free as (fb, db):
        for x, y in data:
            da.step(((fa(x) - y) ** 2).mean())
            db.step(((fb(x) - y) ** 2).mean())
        for a, b in zip(fa.parameters(), fb.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert b.is_leaf and b.requires_grad
        assert all(
            not isinstance(v, torch.Tensor) or v.grad_fn is None
            for group in db.state for entry in group.values() for v in entry.values()
        )
        with pytest.raises(ValueError, match="not tracking higher gradients"):
            fb.parameters(time=2)
        assert all(p is q for p, q in zip(fb.parameters(time=0), fb.parameters(), strict=True))
        with pytest.raises(RuntimeError, match="not tracking"):
            fb.init_fast_params  # noqa: B018
        assert len(fa._state.history) == len(data) + 1
    assert len(fb._state.history) == 1


def test_context_exit_keeps_time_zero_and_latest_only():
    data = _data(5)
    model = _bn_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        first, last = list(fmodel.parameters(time=0)), list(fmodel.parameters())
        middle = fmodel.parameters(time=2)
        assert middle is not None
    assert len(fmodel._state.history) == 2
    assert all(a is b for a, b in zip(fmodel.parameters(time=0), first, strict=True))
    assert all(a is b for a, b in zip(fmodel.parameters(), last, strict=True))
    with pytest.raises(ValueError, match="released when innerloop_ctx exited"):
        fmodel.parameters(time=2)
    # a loss computed after the exit still reaches time 0
    loss = fmodel(data[0][0]).pow(2).sum()
    assert all(g is not None for g in torch.autograd.grad(loss, first))


def test_batchnorm_student_state_dict_round_trip_matches_torch_training():
    """Commentaries' pattern: train on fast weights, then student.load_state_dict(fnet.state_dict())."""
    data = _data(5)
    student, twin = _bn_net(), _bn_net()
    before = _snapshot(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(student, opt, copy_initial_weights=False) as (fnet, diffopt):
        for x, y in data:
            diffopt.step(((fnet(x) - y) ** 2).mean())
        # the student itself has not moved: weights and running statistics as before
        for k, (_, v) in before.items():
            assert torch.equal(student.state_dict()[k], v)
        fnet.eval()
        eval_out = fnet(data[0][0])
        assert student.training and student[1].training  # modes are restored after a call
    student.load_state_dict(fnet.state_dict())

    topt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        topt.zero_grad()
        ((twin(x) - y) ** 2).mean().backward()
        topt.step()
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=1e-12, atol=1e-14)
    twin.eval()
    torch.testing.assert_close(eval_out, twin(data[0][0]), rtol=1e-12, atol=1e-14)
    assert int(student[1].num_batches_tracked) == len(data)


def test_fmodel_state_dict_load_state_dict_and_buffers():
    model = _bn_net()
    fmodel = higher.monkeypatch(model)
    x, _ = _data(1)[0]
    fmodel(x)
    names = [n for n, _ in fmodel.named_buffers()]
    assert names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert int(fmodel[1].num_batches_tracked) == 1 and int(model[1].num_batches_tracked) == 0
    sd = fmodel.state_dict()
    assert list(sd) == list(model.state_dict())
    assert all(not v.requires_grad for v in sd.values())
    other = higher.monkeypatch(_bn_net(seed=5))
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k])
    with pytest.raises(RuntimeError, match="missing keys"):
        other.load_state_dict({"0.weight": sd["0.weight"]})


def test_rnn_and_submodule_views():
    torch.manual_seed(0)
    rnn = nn.GRU(4, 5, num_layers=2).double()
    frnn = higher.monkeypatch(rnn)
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    out, h = frnn(x)
    ref, href = rnn(x)
    assert torch.equal(out, ref) and torch.equal(h, href)
    grads = torch.autograd.grad(out.sum(), list(frnn.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)
    model = _bn_net()
    fmodel = higher.monkeypatch(model)
    view = fmodel[-1]
    assert [n for n, _ in view.named_parameters()] == ["weight", "bias"]
    assert view.weight is list(fmodel.parameters())[-2]


def test_module_tree_views_switch_modes_locally():
    model = _bn_net()
    fmodel = higher.monkeypatch(model)
    assert [n for n, _ in fmodel.named_modules()] == ["", "0", "1", "2", "3"]
    assert [n for n, _ in fmodel.named_children()] == ["0", "1", "2", "3"]
    for m in fmodel.modules():
        if isinstance(m.wrapped_module(), nn.BatchNorm1d):
            m.eval()  # freeze BatchNorm in the patched copy only
    x, _ = _data(1)[0]
    before = fmodel[1].running_mean.clone()
    fmodel(x)
    assert torch.equal(fmodel[1].running_mean, before)  # eval mode: statistics read, not updated
    assert model[1].training and fmodel.training and not fmodel[1].training


def test_errors_name_the_fix():
    model = _bn_net()
    fmodel = higher.monkeypatch(model)
    with pytest.raises(ValueError, match="expected 6 fast weights"):
        fmodel(torch.zeros(2, 3, dtype=torch.float64), params=[torch.zeros(1)])
    with pytest.raises(ValueError, match="already a patched module"):
        higher.monkeypatch(fmodel)
    bare = higher.patch.make_functional(model)
    with pytest.raises(ValueError, match="params keyword must be provided"):
        bare(torch.zeros(2, 3, dtype=torch.float64))
    out = bare(torch.zeros(2, 3, dtype=torch.float64), params=list(model.parameters()))
    assert out.shape == (2, 2)
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not among the reference parameters"):
        higher.optim.get_diff_optim(opt, model.parameters(), fmodel)
