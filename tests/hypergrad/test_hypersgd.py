"""HyperSGD: equal to the engine's one-pass loop bit for bit, greedy equal to Baydin's closed
form, resume bit for bit, learning beats not learning, and the README example runs."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits
from torch import nn
from torch.func import functional_call

import bilevel
from bilevel import hypergrad
from bilevel.errors import ConfigError
from bilevel.optim import SGDState, sgd
from tests.readme import example

T = 5


def _digits(n_batches: int, n_val: int):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    g = torch.Generator().manual_seed(1)
    train = [torch.randint(1200, (50,), generator=g) for _ in range(n_batches)]
    val = [1200 + torch.randint(597, (100,), generator=g) for _ in range(n_val)]
    return x, y, train, val


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _reference(model, x, y, train, val, *, lr, wd, mom, terms, clip, elementwise):
    """The engine's one-pass loop written out (the recipes' code before HyperSGD): T-1
    constant steps, then hypergrad.one_pass on the T-th with the earlier momentum buffer as
    a constant, Adam on log10 lr / log10 wd / logit momentum, log10 lr clipped."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = {k: torch.zeros_like(v) for k, v in w.items()}
    lr_raw = torch.tensor(math.log10(lr))  # log10 lr for every weight, or one per tensor
    raw = {"lr": {k: (torch.full(p.shape, math.log10(lr)) if elementwise else lr_raw.clone()).requires_grad_()
                  for k, p in w.items()},
           "weight_decay": torch.tensor(math.log10(wd), requires_grad=True),
           "momentum": torch.tensor(math.log(mom / (1 - mom)), requires_grad=True)}
    outer = torch.optim.Adam([*raw["lr"].values(), raw["weight_decay"], raw["momentum"]], lr=0.05)

    def update(w, b, r, idx, create_graph):
        loss = F.cross_entropy(functional_call(model, w, (x[idx],)), y[idx])
        g = dict(zip(w, torch.autograd.grad(loss, list(w.values()), create_graph=create_graph), strict=True))
        norm = torch.sqrt(sum((v * v).sum() for v in g.values()))
        g = {k: v * torch.clamp(clip / (norm + 1e-6), max=1.0) for k, v in g.items()}
        new, st = sgd.step(w, g, SGDState(b, torch.zeros((), dtype=torch.int64)),
                           lr={k: 10.0 ** v for k, v in r["lr"].items()},
                           weight_decay=10.0 ** r["weight_decay"], momentum=torch.sigmoid(r["momentum"]))
        return new, st.momentum_buffer

    for n, vidx in enumerate(val):
        const = {"lr": {k: v.detach() for k, v in raw["lr"].items()},
                 "weight_decay": raw["weight_decay"].detach(), "momentum": raw["momentum"].detach()}
        for i in range(T - 1):
            wg = {k: v.requires_grad_() for k, v in w.items()}
            new, buf = update(wg, buf, const, train[n * T + i], False)
            w, buf = {k: v.detach() for k, v in new.items()}, {k: v.detach() for k, v in buf.items()}
        b_prev = buf
        last = train[n * T + T - 1]
        r = hypergrad.one_pass(lambda s, h, t, b=b_prev, i=last: update(s, b, h, i, True),
                               lambda s, h, v=vidx: F.cross_entropy(functional_call(model, s, (x[v],)), y[v]),
                               w, raw, terms=terms, has_aux=True, on_divergence="identity")
        w, buf = r.state, r.aux
        outer.zero_grad()
        for p, gg in zip([*raw["lr"].values(), raw["weight_decay"], raw["momentum"]],
                         [*r.hypergrad["lr"].values(), r.hypergrad["weight_decay"], r.hypergrad["momentum"]],
                         strict=True):
            p.grad = gg
        outer.step()
        with torch.no_grad():
            for v in raw["lr"].values():
                v.clamp_(-10.0, 0.0)
    return w, raw


def _drop_in(model, x, y, train, val, **kw):
    opt = bilevel.HyperSGD(model.named_parameters(), lr=0.05, weight_decay=1e-3, momentum=0.5,
                           learn=("lr", "weight_decay", "momentum"), hyper_every=T, **kw)
    for n, vidx in enumerate(val):
        for i in range(T):
            idx = train[n * T + i]
            opt.step(lambda idx=idx: F.cross_entropy(model(x[idx]), y[idx]))
        assert opt.hyper_step(lambda vidx=vidx: F.cross_entropy(model(x[vidx]), y[vidx])) is not None
    return opt


@pytest.mark.parametrize("elementwise", [False, True], ids=["per-tensor", "per-element"])
def test_drop_in_equals_the_engine_one_pass_loop_bit_for_bit(elementwise):
    x, y, train, val = _digits(8 * T, 8)
    ref_w, ref_raw = _reference(_mlp(), x, y, train, val, lr=0.05, wd=1e-3, mom=0.5, terms=3,
                                clip=1.0, elementwise=elementwise)
    model = _mlp()
    opt = _drop_in(model, x, y, train, val, terms=3, grad_clip=1.0,
                   granularity={"lr": "element" if elementwise else "tensor"})
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), ref_w[k]), k
    assert torch.equal(opt.hp.raw_tree()["momentum"].detach(), ref_raw["momentum"].detach())
    h = opt.hyperparameters()
    assert set(h) >= {"weight_decay", "momentum"}
    assert opt.param_groups[0]["momentum"] == h["momentum"]


def test_greedy_is_baydins_closed_form():
    """One SGD step, lr = 10**r: dL(w1)/dr = -ln(10) lr ∇L(w1)·∇L(w0)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = bilevel.HyperSGD(model.parameters(), lr=0.1, method="greedy", hyper_every=1)
    w0 = [p.detach().clone() for p in model.parameters()]
    g0 = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    opt.step(lambda: F.mse_loss(model(x), y))
    g1 = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    hg, _ = opt.hypergradient(lambda: F.mse_loss(model(x), y))
    want = -torch.log(torch.tensor(10.0)) * 0.1 * sum((a * b).sum() for a, b in zip(g1, g0, strict=True))
    torch.testing.assert_close(hg["lr"], want)
    for p, w in zip(model.parameters(), w0, strict=True):  # the weights are w1, not w0
        assert not torch.equal(p.detach(), w)


def test_state_dict_resumes_bit_for_bit():
    x, y, train, val = _digits(12 * T, 12)
    full = _mlp()
    opt = _drop_in(full, x, y, train, val, granularity={"lr": "element"}, terms=3)

    first = _mlp()
    half = _drop_in(first, x, y, train[: 5 * T], val[:5], granularity={"lr": "element"}, terms=3)
    for j in range(2):  # two plain steps past the hyper boundary, then save
        idx = train[5 * T + j]
        half.step(lambda idx=idx: F.cross_entropy(first(x[idx]), y[idx]))
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": half.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)

    resumed = _mlp(seed=123)  # a fresh model and optimiser, other initial weights
    resumed.load_state_dict(saved["model"])
    opt2 = bilevel.HyperSGD(resumed.named_parameters(), lr=0.05, weight_decay=1e-3, momentum=0.5,
                            learn=("lr", "weight_decay", "momentum"), hyper_every=T,
                            granularity={"lr": "element"}, terms=3)
    opt2.load_state_dict(saved["opt"])
    for n in range(5, 12):
        for i in range(2 if n == 5 else 0, T):
            idx = train[n * T + i]
            opt2.step(lambda idx=idx: F.cross_entropy(resumed(x[idx]), y[idx]))
        opt2.hyper_step(lambda n=n: F.cross_entropy(resumed(x[val[n]]), y[val[n]]))
    for (k, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), k
    assert opt2.t == opt.t == 12 * T
    with pytest.raises(ConfigError, match="same ones"):
        bilevel.HyperSGD(resumed.parameters(), lr=0.1).load_state_dict(saved["opt"])


def _diabetes():
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y, dtype=torch.float32)[:, None]
    y = (y - y.mean()) / y.std()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, va = perm[:300], perm[300:]
    batches = [(x[i], y[i]) for i in (tr[torch.randint(300, (32,), generator=g)] for _ in range(300))]
    return batches, x[va], y[va]


def test_readme_example_learns_and_beats_its_unlearned_twin():
    batches, xv, yv = _diabetes()
    code = example("hypersgd")
    scope = {"torch": torch, "nn": nn, "F": F, "bilevel": bilevel, "train_batches": batches,
             "xv": xv, "yv": yv, "print": lambda *a: None}
    torch.manual_seed(0)
    exec(code, scope)
    learned = float(F.mse_loss(scope["model"](xv), yv).detach())
    fixed_scope = dict(scope, bilevel=_Fixed)
    torch.manual_seed(0)
    exec(code, fixed_scope)
    fixed = float(F.mse_loss(fixed_scope["model"](xv), yv).detach())
    h = scope["opt"].hyperparameters()
    assert h["lr"] > 1e-3  # started tiny: learning moves it up
    assert learned < fixed - 0.02, (learned, fixed)


class _Fixed:
    """``bilevel`` with HyperSGD learning nothing (the unlearned twin)."""

    @staticmethod
    def HyperSGD(params, **kw):
        return bilevel.HyperSGD(params, **{**kw, "learn": ()})


def test_plain_steps_without_closure_and_errors():
    model = nn.Linear(3, 1)
    opt = bilevel.HyperSGD(model.parameters(), lr=0.1, hyper_every=2)
    F.mse_loss(model(torch.ones(2, 3)), torch.zeros(2, 1)).backward()
    w = model.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w - 0.1 * model.weight.grad, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="needs step\\(closure\\)"):
        opt.step()
    assert opt.hyper_step(lambda: 1 / 0) is None  # not due: the closure is never called
    opt.step(lambda: F.mse_loss(model(torch.ones(2, 3)), torch.zeros(2, 1)))
    with pytest.raises(RuntimeError, match="hyper_step"):
        opt.step(lambda: F.mse_loss(model(torch.ones(2, 3)), torch.zeros(2, 1)))
    with pytest.raises(RuntimeError, match="hyper_step first"):
        opt.state_dict()
    with pytest.raises(ConfigError, match="unknown"):
        bilevel.HyperSGD(model.parameters(), lr=0.1, learn=("beta",))
    with pytest.raises(ConfigError, match="momentum"):
        bilevel.HyperSGD(model.parameters(), lr=0.1, learn=("momentum",))  # 0 cannot be learned
    with pytest.raises(TypeError, match="one parameter group"):
        bilevel.HyperSGD([{"params": model.parameters()}], lr=0.1)
