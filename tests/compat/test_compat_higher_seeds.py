"""Loops in the style of the Commentaries and GTN seeds, checked against bilevel's engine.

Each loop is written as the seeds write it against ``higher`` (only the import differs);
the same inner training is then written as a pure step map for
:func:`bilevel.hypergrad.unrolled`, with the update rules of :mod:`bilevel.optim`, and the
hypergradients must agree in float64.

* Commentaries (``comms-weighting.py``): a teacher weights per-example losses of a
  BatchNorm student trained by SGD with momentum (or Adam) from
  ``innerloop_ctx(student, opt, copy_initial_weights=False)``; afterwards
  ``student.load_state_dict(fnet.state_dict())``.
* GTN (GoodAI ``learning_loop.py``): a generator makes the training batches from a learned
  noise tensor; SGD with momentum whose ``lr`` and ``momentum`` are tensors passed through
  ``override`` (or Adam with tensor ``lr`` and ``betas``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import bilevel.compat.higher as higher
from bilevel import hypergrad
from bilevel.functional import call, module_state
from bilevel.optim import adam, sgd

STEPS = 5


def _student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
    ).double()


class Teacher(nn.Module):
    """Per-example loss weights in (0, 1) that also see the inner step (a curriculum)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        step = torch.full_like(x[:, :1], i / STEPS)
        return torch.sigmoid(self.net(torch.cat([x, step], dim=1)))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
        for _ in range(STEPS + 2)
    ]
    return batches[:STEPS], batches[STEPS:]


def _inner_opt(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_commentaries_loop_matches_the_engine(kind):
    train, val = _data()
    torch.manual_seed(1)
    teacher = Teacher().double()
    student = _student(2)

    # -- the seed's loop, on bilevel.compat.higher ------------------------------------
    opt = _inner_opt(kind, student.parameters())
    with higher.innerloop_ctx(student, opt, copy_initial_weights=False) as (fnet, diffopt):
        for i, (x, y) in enumerate(train):
            c = teacher(x, i).squeeze(-1)
            diffopt.step((c * F.cross_entropy(fnet(x), y, reduction="none")).sum())
        meta = sum(F.cross_entropy(fnet(x), y, reduction="sum") for x, y in val) / len(val)
        meta.backward()
    student.load_state_dict(fnet.state_dict())

    # -- the same training as a step map for the engine -------------------------------
    fresh = _student(2)
    params, buffers = module_state(fresh)
    rule = sgd if kind == "sgd" else adam
    settings = {"lr": 0.1, "momentum": 0.9} if kind == "sgd" else {"lr": 0.01}
    state0 = {"params": params, "buffers": buffers, "opt": rule.init(params)}
    h = {k: v.detach().clone().requires_grad_() for k, v in teacher.named_parameters()}

    def step(state, h, t):
        x, y = train[t]
        c = functional_call(teacher, h, (x, t)).squeeze(-1)

        def loss(p):
            out, new_b = call(fresh, p, state["buffers"], x)
            return (c * F.cross_entropy(out, y, reduction="none")).sum(), new_b

        g, new_b = grad(loss, has_aux=True)(state["params"])
        new_p, new_opt = rule.step(state["params"], g, state["opt"], **settings)
        return {"params": new_p, "buffers": new_b, "opt": new_opt}

    def outer(state, h):
        outs = [call(fresh, state["params"], state["buffers"], x)[0] for x, _ in val]
        return sum(F.cross_entropy(o, y, reduction="sum") for o, (_, y) in zip(outs, val, strict=True)) / len(val)

    r = hypergrad.unrolled(step, outer, state0, h, steps=STEPS)
    assert float(meta.detach()) == pytest.approx(float(r.outer_loss), rel=1e-12)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p.grad, r.hypergrad[name], rtol=1e-9, atol=1e-12)
    assert float(teacher.net[0].weight.grad.abs().sum()) > 0
    # load_state_dict(fnet.state_dict()) carries the trained weights over, and the BN
    # statistics, which the train-mode meta-loss passes advanced further (as in the seed)
    # (with Adam, the Linear bias in front of BatchNorm has a gradient that is 0 up to
    # rounding noise, which Adam normalises into updates of ~1e-10 that differ between any
    # two implementations; it has no effect on the output)
    atol = 1e-14 if kind == "sgd" else 1e-8
    for k, v in r.state["params"].items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=1e-12, atol=atol)
    assert int(student[1].num_batches_tracked) == STEPS + len(val)
    # copy_initial_weights=False: the outer gradient also reached the student's init
    assert all(p.grad is not None for p in student.parameters())


class Generator(nn.Module):
    """Makes a batch of inputs from noise and one-hot targets."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6 + 3, 12), nn.LeakyReLU(0.1), nn.Linear(12, 4))

    def forward(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(torch.cat([z, onehot], dim=1)))


def _learner(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.LeakyReLU(0.1), nn.BatchNorm1d(8), nn.Linear(8, 3)
    ).double()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_gtn_loop_with_tensor_override_matches_the_engine(kind):
    torch.manual_seed(3)
    gen = Generator().double()
    z = torch.rand(STEPS, 9, 6, dtype=torch.float64, requires_grad=True)  # learned curriculum
    targets = torch.arange(9) % 3
    onehot = F.one_hot(targets, 3).double()
    g = torch.Generator().manual_seed(4)
    x_real = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y_real = torch.randint(0, 3, (32,), generator=g)
    if kind == "sgd":
        hyper = {"lr": torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
                 "momentum": torch.tensor(0.5, dtype=torch.float64, requires_grad=True)}
        override = {"lr": [hyper["lr"]], "momentum": [hyper["momentum"]]}
    else:
        hyper = {"lr": torch.tensor(0.01, dtype=torch.float64, requires_grad=True),
                 "b1": torch.tensor(0.8, dtype=torch.float64, requires_grad=True),
                 "b2": torch.tensor(0.95, dtype=torch.float64, requires_grad=True)}
        override = {"lr": [hyper["lr"]], "betas": [(hyper["b1"], hyper["b2"])]}

    def inner_loss(logits, s_onehot):
        # the seed's default reduction='mean' (over batch x classes), without its warning
        return F.kl_div(F.log_softmax(logits, dim=1), s_onehot, reduction="sum") / s_onehot.numel()

    # -- the seed's loop, on bilevel.compat.higher ------------------------------------
    learner = _learner(5)
    opt = _inner_opt(kind, learner.parameters())
    with higher.innerloop_ctx(learner, opt, override=override) as (fnet, diffopt):
        for s in range(STEPS):
            diffopt.step(inner_loss(fnet(gen(z[s], onehot)), onehot))
        meta = F.cross_entropy(fnet(x_real), y_real)
        leaves = [*gen.parameters(), z, *hyper.values()]
        ours = torch.autograd.grad(meta, leaves)

    # -- the engine ---------------------------------------------------------------------
    fresh = _learner(5)
    params, buffers = module_state(fresh)
    rule = sgd if kind == "sgd" else adam
    h = {"gen": {k: v.detach().clone().requires_grad_() for k, v in gen.named_parameters()},
         "z": z.detach().clone().requires_grad_(),
         **{k: v.detach().clone().requires_grad_() for k, v in hyper.items()}}

    def step(state, h, t):
        x = functional_call(gen, h["gen"], (h["z"][t], onehot))

        def loss(p):
            out, new_b = call(fresh, p, state["buffers"], x)
            return inner_loss(out, onehot), new_b

        g, new_b = grad(loss, has_aux=True)(state["params"])
        if kind == "sgd":
            new_p, new_opt = sgd.step(state["params"], g, state["opt"], lr=h["lr"], momentum=h["momentum"])
        else:
            new_p, new_opt = adam.step(state["params"], g, state["opt"], lr=h["lr"], betas=(h["b1"], h["b2"]))
        return {"params": new_p, "buffers": new_b, "opt": new_opt}

    def outer(state, h):
        return F.cross_entropy(call(fresh, state["params"], state["buffers"], x_real)[0], y_real)

    state0 = {"params": params, "buffers": buffers, "opt": rule.init(params)}
    r = hypergrad.unrolled(step, outer, state0, h, steps=STEPS)
    theirs = [*r.hypergrad["gen"].values(), r.hypergrad["z"], *(r.hypergrad[k] for k in hyper)]
    # Adam divides by sqrt(v), so rounding differences of small gradient entries grow
    # (measured: 3e-9 of the tensor's norm); SGD agrees to 1e-12
    tol = 1e-12 if kind == "sgd" else 1e-8
    for a, b in zip(ours, theirs, strict=True):
        assert float((a - b).norm()) <= tol * float(b.norm()), (a, b)
    assert all(float(v.abs()) > 0 for v in ours[-len(hyper):])
