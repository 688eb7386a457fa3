"""bilevel.compat.higher beside the real ``higher`` (needs the ``peers`` extra), in float64.

    .venv/bin/python benchmarks/compat_higher.py

Prints three tables:

1. hypergradients of a Commentaries-style loop (a teacher weighting per-example losses of
   a BatchNorm student, ``copy_initial_weights=False``) and a GTN-style loop (a generator
   making the batches, tensor ``override`` of the inner optimiser's settings), each with
   SGD+momentum and with Adam, 10 inner steps: relative difference between the libraries;
2. the derivative of the GTN-style meta-loss with respect to a tensor ``beta2`` of Adam,
   from autograd and from a central finite difference, in each library;
3. live tensor bytes (storages alive, counted exactly by a ``TorchDispatchMode``) after 20
   and after 200 outer loops, and after 20 and 200 inner steps with
   ``track_higher_grads=False``;
4. how often the premise of higher's ``testDiffOptCallback`` (Adam on gradients scaled by
   1, 0.1 and 0.2 gives results that are not ``allclose``) fails, over 200 seeds, for each
   library and for ``torch.optim.Adam`` itself.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bilevel.compat.higher as ours

warnings.simplefilter("ignore")  # higher 0.2.1 converts a tensor beta to a float, with a warning
import higher as real  # noqa: E402

STEPS = 10
LIBS = (("higher 0.2.1", real), ("bilevel.compat.higher", ours))


def commentaries(lib, kind: str) -> list[torch.Tensor]:
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    torch.manual_seed(2)
    student = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(STEPS + 2)]
    if kind == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    with lib.innerloop_ctx(student, opt, copy_initial_weights=False) as (fnet, diffopt):
        for i, (x, y) in enumerate(data[:STEPS]):
            c = torch.sigmoid(teacher(torch.cat([x, torch.full_like(x[:, :1], i / STEPS)], 1)))
            diffopt.step((c.squeeze(-1) * F.cross_entropy(fnet(x), y, reduction="none")).sum())
        meta = sum(F.cross_entropy(fnet(x), y, reduction="sum") for x, y in data[STEPS:]) / 2
        meta.backward()
    return [p.grad for p in (*teacher.parameters(), *student.parameters())]


def gtn(lib, kind: str, beta2: float = 0.95, act=nn.LeakyReLU) -> tuple[torch.Tensor, list]:
    torch.manual_seed(3)
    gen = nn.Sequential(nn.Linear(9, 12), nn.LeakyReLU(0.1), nn.Linear(12, 4)).double()
    z = torch.rand(STEPS, 9, 6, dtype=torch.float64, requires_grad=True)
    onehot = F.one_hot(torch.arange(9) % 3, 3).double()
    g = torch.Generator().manual_seed(4)
    x_real = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y_real = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(5)
    learner = nn.Sequential(nn.Linear(4, 8), act(), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    if kind == "sgd":
        hyper = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.1, 0.5)]
        opt = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.5)
        override = {"lr": [hyper[0]], "momentum": [hyper[1]]}
    else:
        hyper = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.01, 0.8, beta2)]
        opt = torch.optim.Adam(learner.parameters(), lr=0.01)
        override = {"lr": [hyper[0]], "betas": [(hyper[1], hyper[2])]}
    with lib.innerloop_ctx(learner, opt, override=override) as (fnet, diffopt):
        for s in range(STEPS):
            x = torch.tanh(gen(torch.cat([z[s], onehot], 1)))
            logp = F.log_softmax(fnet(x), 1)
            diffopt.step(F.kl_div(logp, onehot, reduction="sum") / onehot.numel())
        meta = F.cross_entropy(fnet(x_real), y_real)
    return meta, [*gen.parameters(), z, *hyper]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True))
    return (num / sum(float((y**2).sum()) for y in b)) ** 0.5


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out,) if isinstance(out, torch.Tensor) else tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                self.seen[ref.cdata] = (ref, t.untyped_storage().nbytes())
        return out

    def live(self) -> int:
        self.seen = {k: v for k, v in self.seen.items() if not v[0].expired()}
        return sum(n for _, n in self.seen.values())


def memory(lib, *, outer: bool, n: int = 200) -> list[int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1)).double()
    scale = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64),
             torch.randn(8, 1, generator=g, dtype=torch.float64)) for _ in range(4)]
    marks = []
    with LiveBytes() as tracker:
        if outer:  # a new inner loop per outer step, meta-gradient, student kept
            for it in range(n):
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fnet, diffopt):
                    for x, y in data[:2]:
                        diffopt.step(torch.exp(scale) * ((fnet(x) - y) ** 2).mean())
                    ((fnet(data[3][0]) - data[3][1]) ** 2).mean().backward()
                model.load_state_dict(fnet.state_dict())
                model.zero_grad()
                scale.grad = None
                if it + 1 in (20, n):
                    marks.append(tracker.live())
        else:  # one long detached inner loop (test time)
            opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
            with lib.innerloop_ctx(model, opt, copy_initial_weights=False,
                                   track_higher_grads=False) as (fnet, diffopt):
                for it in range(n):
                    x, y = data[it % 4]
                    diffopt.step(((fnet(x) - y) ** 2).mean())
                    if it + 1 in (20, n):
                        marks.append(tracker.live())
    return marks


def _callback_premise_fails(lib, seeds: int = 200) -> int:
    """Seeds where Adam with gradients scaled by 1, 0.1, 0.2 gives allclose results."""
    fails = 0
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4, bias=False),
                              nn.Sigmoid(), nn.Linear(4, 2))
        scales = (1.0, 0.1, 0.2)
        if lib is None:  # torch.optim.Adam on three copies
            copies = [copy.deepcopy(model) for _ in scales]
            opts = [torch.optim.Adam(c.parameters(), lr=0.1) for c in copies]
        else:
            opt = torch.optim.Adam(model.parameters(), lr=0.1)
            fmodels = [lib.patch.monkeypatch(model) for _ in scales]
            diffopts = [lib.optim.get_diff_optim(opt, model.parameters(), f,
                                                 grad_callback=lambda gs, s=s: [g * s for g in gs])
                        for f, s in zip(fmodels, scales, strict=True)]
        for _ in range(3):
            x = torch.rand(10, 4)
            if lib is None:
                for c, o, s in zip(copies, opts, scales, strict=True):
                    o.zero_grad()
                    c(x).pow(2).sum().backward()
                    for p in c.parameters():
                        p.grad.mul_(s)
                    o.step()
            else:
                for f, d in zip(fmodels, diffopts, strict=True):
                    d.step(f(x).pow(2).sum())
        finals = [list(c.parameters()) for c in copies] if lib is None else [
            list(f.parameters()) for f in fmodels]
        same = [all(torch.allclose(a, b) for a, b in zip(finals[i], finals[j], strict=True))
                for i, j in ((0, 1), (0, 2), (1, 2))]
        fails += any(same)
    return fails


def main() -> None:
    torch.set_num_threads(1)
    print("1. hypergradients, bilevel.compat.higher vs higher 0.2.1 (relative difference of all leaves)")
    for kind in ("sgd", "adam"):
        c = rel(commentaries(ours, kind), commentaries(real, kind))
        grads = []
        for lib in (ours, real):
            meta, leaves = gtn(lib, kind)
            grads.append(list(torch.autograd.grad(meta, leaves)))
        print(f"   {kind:5s} commentaries-style {c:.2e}   gtn-style {rel(*grads):.2e}")
    print("2. d meta / d beta2 (GTN-style, Adam, Tanh learner), autograd vs central difference (eps 1e-5)")
    for name, lib in LIBS:
        meta, leaves = gtn(lib, "adam", act=nn.Tanh)
        (d,) = torch.autograd.grad(meta, leaves[-1])
        up, down = (float(gtn(lib, "adam", 0.95 + s * 1e-5, nn.Tanh)[0].detach()) for s in (1, -1))
        print(f"   {name:22s} autograd {float(d):+.10f}   finite difference {(up - down) / 2e-5:+.10f}")
    print("3. live tensor bytes")
    for name, lib in LIBS:
        print(f"   {name:22s} after 20 / 200 outer loops {memory(lib, outer=True)}; "
              f"after 20 / 200 detached inner steps {memory(lib, outer=False)}")
    print("4. seeds (of 200) where Adam on gradients x1, x0.1, x0.2 ends allclose (float32)")
    for name, lib in (*LIBS, ("torch.optim.Adam", None)):
        print(f"   {name:22s} {_callback_premise_fails(lib)}")


if __name__ == "__main__":
    main()
