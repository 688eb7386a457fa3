"""The module kit: nn.Modules in, the engine's step/outer_loss out, hypergradients into .grad.

Every hypergradient is checked in float64 against the same computation written by hand on
parameter dicts (the glue the kit replaces), against finite differences, or against another
method; the README journey runs verbatim.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import hypergrad, optim
from bilevel.functional import call, module_state
from tests.readme import example, user_lines

HIGHER_LINES = 9  # the same journey written against higher.innerloop_ctx (issue 15)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def _data(steps: int = 20):
    batches = [(torch.randn(16, 64), torch.randint(10, (16,))) for _ in range(steps)]
    return batches, torch.randn(64, 64), torch.randint(10, (64,))


def _run_journey():
    batches, xv, yv = _data()
    scope = {"torch": torch, "nn": nn, "F": F, "hypergrad": hypergrad, "batches": batches,
             "xv": xv, "yv": yv}
    exec(example("module-journey"), scope)
    return scope


def _by_hand(student, teacher, batches, xv, yv, lr=0.1):
    """The journey with the glue the kit removes (params dicts, call, func.grad, sgd.step)."""
    theta, bufs = module_state(student)
    phi, tbufs = module_state(teacher)
    phi = {k: v.requires_grad_() for k, v in phi.items()}
    opt = optim.sgd.init(theta)
    theta = {k: v.requires_grad_() for k, v in theta.items()}
    for x, y in batches:
        def loss(p, bufs=bufs, x=x, y=y):
            c, _ = call(teacher, phi, tbufs, x)
            out, new = call(student, p, bufs, x)
            return (c[:, 0] * F.cross_entropy(out, y, reduction="none")).sum(), new
        g, bufs = torch.func.grad(loss, has_aux=True)(theta)
        theta, opt = optim.sgd.step(theta, g, opt, lr=lr)
    val = F.cross_entropy(call(student, theta, bufs, xv)[0], yv)
    return dict(zip(phi, torch.autograd.grad(val, list(phi.values())), strict=True)), bufs


def test_readme_journey_matches_the_glue_it_replaces_and_is_no_longer_than_higher():
    torch.manual_seed(1)
    scope = _run_journey()
    teacher, student, r = scope["teacher"], scope["student"], scope["r"]
    assert user_lines(example("module-journey")) <= HIGHER_LINES
    # write_grad put r.hypergrad in .grad, then Adam moved the teacher: undo the move to
    # compare at the point where the hypergradient was taken.
    grads = {k: p.grad.clone() for k, p in teacher.named_parameters()}
    for k in grads:
        torch.testing.assert_close(grads[k], r.hypergrad[k], rtol=0, atol=0)
    with torch.no_grad():  # Adam's first step moves each entry by lr * sign(g) (almost)
        for p in teacher.parameters():
            p.add_(1e-3 * p.grad / (p.grad.abs() + 1e-8))
    want, bufs = _by_hand(student, teacher, scope["batches"], scope["xv"], scope["yv"])
    for k in want:
        torch.testing.assert_close(r.hypergrad[k], want[k], rtol=1e-10, atol=1e-12)
    # BatchNorm: running statistics advanced in the state, not in the module
    torch.testing.assert_close(r.state["buffers"]["1.running_mean"], bufs["1.running_mean"])
    assert bool((student[1].running_mean == 0).all())
    assert int(r.state["buffers"]["1.num_batches_tracked"]) == 20


def test_kit_hypergradient_equals_finite_differences_and_forward_mode():
    batches, xv, yv = _data(5)
    student = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    teacher = nn.Sequential(nn.Linear(64, 1), nn.Sigmoid())

    def train_loss(s, t, x, y):
        return (t(x)[:, 0] * F.cross_entropy(s(x), y, reduction="none")).mean()

    def val_loss(s, t):
        return F.cross_entropy(s(xv), yv)

    p = hypergrad.problem(student, train_loss, val_loss, hparams=teacher, batches=batches, lr=0.5)
    rev = hypergrad.unrolled(*p, steps=5).hypergrad["0.bias"]
    fwd = hypergrad.forward(*p, steps=5).hypergrad["0.bias"]
    torch.testing.assert_close(rev, fwd, rtol=1e-10, atol=1e-13)

    def outer_at(delta: float) -> float:
        h = {k: v.detach().clone() for k, v in p.hparams.items()}
        h["0.bias"] = h["0.bias"] + delta
        s = p.state
        for t in range(5):
            s = p.step(s, h, t)
        return float(p.outer_loss(s, h))

    eps = 1e-6
    fd = (outer_at(eps) - outer_at(-eps)) / (2 * eps)
    assert float(rev) == pytest.approx(fd, rel=1e-6)


def test_tensor_hyperparameters_and_a_learned_learning_rate():
    """hparams as tensors; lr given as a callable of them; Adam as the rule."""
    batches, xv, yv = _data(4)
    model = nn.Linear(64, 10)
    h = {"log_lr": torch.tensor(-2.0, requires_grad=True), "wd": torch.tensor(0.01, requires_grad=True)}

    def train_loss(m, hp, x, y):
        return F.cross_entropy(m(x), y) + hp["wd"] * sum((w * w).sum() for w in m.parameters())

    p = hypergrad.problem(model, train_loss, lambda m, hp: F.cross_entropy(m(xv), yv), hparams=h,
                          batches=batches, rule=optim.adam, lr=lambda hp: 10 ** hp["log_lr"])
    r = hypergrad.unrolled(*p, steps=4)
    # by hand
    w = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    st = optim.adam.init(w)
    for x, y in batches:
        def loss(q, x=x, y=y):
            return (F.cross_entropy(torch.func.functional_call(model, q, (x,)), y)
                    + h["wd"] * sum((v * v).sum() for v in q.values()))
        w, st = optim.adam.step(w, torch.func.grad(loss)(w), st, lr=10 ** h["log_lr"])
    val = F.cross_entropy(torch.func.functional_call(model, w, (xv,)), yv)
    want = torch.autograd.grad(val, [h["log_lr"], h["wd"]])
    torch.testing.assert_close(r.hypergrad["log_lr"], want[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(r.hypergrad["wd"], want[1], rtol=1e-10, atol=1e-14)
    # the learned direction helps: a small step against the hypergradient lowers L_V
    with torch.no_grad():
        h["log_lr"] -= 0.1 * r.hypergrad["log_lr"].sign()
    assert float(hypergrad.unrolled(*p, steps=4).outer_loss) < float(r.outer_loss)


def test_write_grad_maps_nested_modules_and_tensors_and_clips():
    a, b = nn.Linear(3, 2), nn.Linear(2, 1)
    s = torch.tensor(1.0, requires_grad=True)
    hp = {"gen": a, "parts": [b, s]}
    tree = hypergrad.kit.engine_tree(hp)
    grads = {"gen": {k: torch.full_like(v, 2.0) for k, v in tree["gen"].items()},
             "parts": [{k: torch.full_like(v, 2.0) for k, v in tree["parts"][0].items()},
                       torch.tensor(2.0)]}
    norm = hypergrad.write_grad(grads, hp)
    n = sum(p.numel() for p in (*a.parameters(), *b.parameters())) + 1
    assert float(norm) == pytest.approx(2.0 * n ** 0.5)
    assert bool((a.weight.grad == 2).all()) and float(s.grad) == 2.0
    clipped = hypergrad.write_grad(grads, hp, max_norm=1.0)
    assert float(clipped) == pytest.approx(2.0 * n ** 0.5)  # the norm before clipping
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in (*a.parameters(), *b.parameters(), s)))
    assert float(total) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="same hparams"):
        hypergrad.write_grad({"x": torch.zeros(1)}, hp)


def test_load_state_and_frozen_parameters_stay_constant():
    batches, xv, yv = _data(3)
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 10))
    model[0].weight.requires_grad_(False)
    teacher = torch.tensor(1.0, requires_grad=True)
    p = hypergrad.problem(model, lambda m, c, x, y: c * F.cross_entropy(m(x), y),
                          lambda m, c: F.cross_entropy(m(xv), yv), hparams=teacher,
                          batches=batches, lr=0.1)
    assert "0.weight" not in p.state["params"]
    r = hypergrad.unrolled(*p, steps=3)
    frozen = model[0].weight.detach().clone()
    hypergrad.load_state(model, r.state)
    assert torch.equal(model[0].weight, frozen)
    assert torch.equal(model[1].weight, r.state["params"]["1.weight"])


def _aux_step(state, h, t):
    w = state["w"]
    new = {"w": w - 0.1 * (w - h["c"])}
    return new, {"t": torch.tensor(float(t)), "norm": w.norm()}


def _outer(state, h):
    return (state["w"] ** 2).sum()


@pytest.mark.filterwarnings("ignore::bilevel.errors.HypergradWarning")  # plumbing, not a fixed point
@pytest.mark.parametrize("method", ["unrolled", "forward", "implicit", "one_pass", "greedy"])
def test_has_aux_on_every_method(method):
    h = {"c": torch.ones(3, requires_grad=True)}
    s0 = {"w": torch.zeros(3)}
    plain = lambda s, hh, t: _aux_step(s, hh, t)[0]  # noqa: E731
    multi = method in ("unrolled", "forward")
    kw = {"steps": 3, "start": 2} if multi else {"start": 2}
    fn = getattr(hypergrad, method)
    r = fn(_aux_step, _outer, s0, h, has_aux=True, **kw)
    ref = fn(plain, _outer, s0, h, **kw)
    torch.testing.assert_close(r.hypergrad["c"], ref.hypergrad["c"])
    auxes = r.aux if multi else [r.aux]
    assert [float(a["t"]) for a in auxes] == ([2.0, 3.0, 4.0] if multi else [2.0])
    assert not auxes[0]["norm"].requires_grad


@pytest.mark.filterwarnings("ignore::bilevel.errors.HypergradWarning")  # plumbing, not a fixed point
def test_old_keywords_warn_and_mean_the_same():
    h = {"c": torch.ones(3, requires_grad=True)}
    s0 = {"w": torch.zeros(3)}
    plain = lambda s, hh, t: _aux_step(s, hh, t)[0]  # noqa: E731
    with pytest.warns(DeprecationWarning, match="terms=K\\+1"):
        old = hypergrad.implicit(plain, _outer, s0, h, iters=3)
    new = hypergrad.implicit(plain, _outer, s0, h, terms=4)
    assert torch.equal(old.hypergrad["c"], new.hypergrad["c"])
    for fn in (hypergrad.one_pass, hypergrad.greedy, hypergrad.implicit):
        with pytest.warns(DeprecationWarning, match="start="):
            fn(plain, _outer, s0, h, t=5)
    with pytest.raises(TypeError, match="not both"):
        hypergrad.implicit(plain, _outer, s0, h, terms=2, iters=1)


def test_import_bilevel_then_attribute_access():
    code = "import bilevel; bilevel.hypergrad.unrolled; bilevel.optim.sgd; print(bilevel.HyperSGD.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "HyperSGD"


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        hypergrad.problem(lambda x: x, None, None)
    with pytest.raises(TypeError, match="rule must be an update rule"):
        hypergrad.problem(nn.Linear(1, 1), None, None, rule=torch.optim.SGD)


def test_kit_has_aux_returns_each_steps_aux():
    """The teacher's example weights of every step come back in r.aux (detached)."""
    batches, xv, yv = _data(3)
    student, teacher = nn.Linear(64, 10), nn.Sequential(nn.Linear(64, 1), nn.Sigmoid())

    def train_loss(s, t, x, y):
        c = t(x)[:, 0]
        return (c * F.cross_entropy(s(x), y, reduction="none")).sum(), c

    p = hypergrad.problem(student, train_loss, lambda s, t: F.cross_entropy(s(xv), yv),
                          hparams=teacher, batches=batches, has_aux=True, lr=0.1)
    r = hypergrad.unrolled(*p, steps=3, has_aux=True)
    assert len(r.aux) == 3 and not r.aux[0].requires_grad
    torch.testing.assert_close(r.aux[1], teacher(batches[1][0])[:, 0].detach())
    plain = hypergrad.problem(student, lambda s, t, x, y: train_loss(s, t, x, y)[0],
                              lambda s, t: F.cross_entropy(s(xv), yv), hparams=teacher,
                              batches=batches, lr=0.1)
    want = hypergrad.unrolled(*plain, steps=3).hypergrad
    for k in want:
        torch.testing.assert_close(r.hypergrad[k], want[k], rtol=0, atol=0)
