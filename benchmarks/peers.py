"""bilevel side by side with higher and TorchOpt on the problems of ``benchmarks/hypergrad.py``.

    pip install -e '.[peers]'        # higher, torchopt (Betty needs Python < 3.11)
    .venv/bin/python benchmarks/peers.py [--reps 3] [--only weighting] [--json out.json]

Problems (fixed seeds; MNIST if cached under $BILEVEL_DATA, else same-shaped random data):

* ``weighting``: MLP 784-256-256-10, batch 128, SGD lr 0.1; λ = a per-example weighting
  teacher (784-16-1, sigmoid·2) whose outputs scale each example's loss. T = 10/50/100.
* ``gtn``: a generator (64-d noise + label → 28×28 image) trains a BatchNorm CNN learner with
  SGD lr 0.02 for T steps; λ = the generator. T = 10/20.
* ``neumann K=5`` / ``cg K=5``: implicit hypergradient of the weighting problem at the
  initial weights (not a minimum: H is indefinite there, so bilevel's CG runs with
  ``on_indefinite="continue"``, as TorchOpt's does by default).

Method per problem: the same inner loop written in each library's own style (bilevel: a pure
step with ``torch.func.grad``, the same step with ``torch.autograd.grad`` ("ag"), and the
module kit, ``hypergrad.problem`` over the modules ("kit"); higher: ``innerloop_ctx``; TorchOpt: ``MetaSGD`` (OOP), and
``custom_root`` with its Neumann/CG solvers for implicit).

Measurement, each configuration in a fresh process: time = median over ``reps`` of the
ratio (method time / plain training time), the two measured back to back in the same
process (paired: load from other processes on a shared machine cancels in part); implicit
rows in plain-step equivalents. Peak = resident-set peak of the first call minus the
resident set after setup (CPU), or ``max_memory_allocated`` (CUDA). Agreement = max |g −
g_bilevel| / max |g_bilevel| over all hypergradient entries, recomputed in float64 at
T = min(T, 10) in the same process.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad

sys.path.insert(0, str(Path(__file__).parent))
from hypergrad import Learner, in_subprocess, mlp, mnist, paired, peak_mib, reset_peak, rss_mib

from bilevel import hypergrad
from bilevel.errors import HypergradWarning
from bilevel.functional import call

Fn = Callable[[], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------- problems
def weighting(dev: torch.device, dtype: torch.dtype, steps: int) -> dict[str, Fn]:
    torch.manual_seed(0)
    x, y, _ = mnist(dev)
    x = x.to(dtype)
    net = mlp().to(dev, dtype)
    teacher = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 1)).to(dev, dtype)
    p0 = {k: v.detach() for k, v in net.named_parameters()}
    lam = {k: v.detach().clone().requires_grad_() for k, v in teacher.named_parameters()}
    lr, xv, yv = 0.1, x[-256:], y[-256:]

    def batch(t: int):
        i = (t * 128) % (x.shape[0] - 384)
        return x[i : i + 128], y[i : i + 128]

    def weights(h, xb):
        return torch.sigmoid(functional_call(teacher, h, (xb,))).squeeze(-1) * 2

    def weighted_loss(p, h, xb, yb):
        ce = nn.functional.cross_entropy(functional_call(net, p, (xb,)), yb, reduction="none")
        return (weights(h, xb) * ce).mean()

    def step(s, h, t):
        g = grad(weighted_loss)(s, h, *batch(t))
        return {k: s[k] - lr * g[k] for k in s}

    def step_ag(s, h, t):  # the same step with torch.autograd.grad (state arrives requiring grad)
        g = torch.autograd.grad(weighted_loss(s, h, *batch(t)), list(s.values()), create_graph=True)
        return {k: v - lr * gk for (k, v), gk in zip(s.items(), g, strict=True)}

    def outer(s, h):
        return nn.functional.cross_entropy(functional_call(net, s, (xv,)), yv)

    def fresh():
        model = copy.deepcopy(net)
        return model, nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v.detach().clone()) for k, v in lam.items()})

    def plain() -> dict:
        model = copy.deepcopy(net)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for t in range(steps):
            xb, yb = batch(t)
            with torch.no_grad():
                w = weights(lam, xb)
            loss = (w * nn.functional.cross_entropy(model(xb), yb, reduction="none")).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return {}

    def teacher_params(pd):  # ParameterDict keys back to the teacher's names
        return {k: pd[k.replace(".", "_")] for k in lam}

    def with_higher() -> dict:
        import higher

        model, pd = fresh()
        h = teacher_params(pd)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for t in range(steps):
                xb, yb = batch(t)
                ce = nn.functional.cross_entropy(fmodel(xb), yb, reduction="none")
                diffopt.step((weights(h, xb) * ce).mean())
            loss = nn.functional.cross_entropy(fmodel(xv), yv)
            return dict(zip(lam, torch.autograd.grad(loss, list(h.values())), strict=True))

    def with_torchopt() -> dict:
        import torchopt

        model, pd = fresh()
        h = teacher_params(pd)
        meta = torchopt.MetaSGD(model, lr=lr)
        for t in range(steps):
            xb, yb = batch(t)
            ce = nn.functional.cross_entropy(model(xb), yb, reduction="none")
            meta.step((weights(h, xb) * ce).mean())
        loss = nn.functional.cross_entropy(model(xv), yv)
        return dict(zip(lam, torch.autograd.grad(loss, list(h.values())), strict=True))

    def implicit_torchopt(solver: str) -> dict:
        import torchopt

        xb, yb = batch(0)
        names = list(p0)

        def optimality(params, meta):
            h = dict(zip(lam, meta, strict=True))  # TorchOpt calls this inside functorch.vjp
            return grad(lambda q: weighted_loss(dict(zip(names, q, strict=True)), h, xb, yb))(params)

        solve = (torchopt.linear_solve.solve_inv(ns=True, maxiter=5, alpha=lr) if solver == "neumann"
                 else torchopt.linear_solve.solve_cg(maxiter=5))

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def inner(params, meta):
            return tuple(q.detach() for q in params)  # the given point, as bilevel's implicit

        meta = tuple(v.detach().clone().requires_grad_() for v in lam.values())
        sol = inner(tuple(p0.values()), meta)
        loss = outer(dict(zip(names, sol, strict=True)), None)
        return dict(zip(lam, torch.autograd.grad(loss, meta), strict=True))

    def ours(st=step, **kw) -> Fn:
        return lambda: hypergrad.unrolled(st, outer, p0, lam, steps=steps, **kw).hypergrad

    def ours_implicit(**kw) -> Fn:
        def run() -> dict:
            with warnings.catch_warnings():  # at the initial weights on purpose: timing only
                warnings.simplefilter("ignore", HypergradWarning)
                k = {"terms": 6} if kw.get("solver") == "neumann" else {"iters": 5}  # K = 5
                return hypergrad.implicit(step, outer, p0, lam, **k, **kw).hypergrad
        return run

    def with_kit(**kw) -> Fn:  # modules in, as the docs tell users to write it
        def train_loss(model, tch, xb, yb):
            w = torch.sigmoid(tch(xb)).squeeze(-1) * 2
            return (w * nn.functional.cross_entropy(model(xb), yb, reduction="none")).mean()

        def run() -> dict:  # λ is the teacher's own parameters (lam holds the same values)
            p = hypergrad.problem(net, train_loss,
                                  lambda model, tch: nn.functional.cross_entropy(model(xv), yv),
                                  hparams=teacher, batches=batch, lr=lr)
            return hypergrad.unrolled(*p, steps=steps, **kw).hypergrad
        return run

    def plain_step() -> dict:
        nonlocal steps
        keep, steps = steps, 1
        plain()
        steps = keep
        return {}

    return {
        "plain": plain, "plain-step": plain_step,
        "bilevel unrolled": ours(), "bilevel checkpointed": ours(checkpoint=True),
        "bilevel unrolled ag": ours(step_ag), "bilevel checkpointed ag": ours(step_ag, checkpoint=True),
        "bilevel kit": with_kit(), "bilevel kit checkpointed": with_kit(checkpoint=True),
        "higher": with_higher, "torchopt OOP": with_torchopt,
        "bilevel neumann": ours_implicit(solver="neumann"),
        "bilevel cg": ours_implicit(solver="cg", on_indefinite="continue"),
        "torchopt neumann": lambda: implicit_torchopt("neumann"),
        "torchopt cg": lambda: implicit_torchopt("cg"),
    }


def gtn(dev: torch.device, dtype: torch.dtype, steps: int) -> dict[str, Fn]:
    torch.manual_seed(0)
    x, y, _ = mnist(dev)
    x = x.to(dtype)
    gen = nn.Sequential(nn.Linear(74, 64 * 7 * 7), nn.LeakyReLU(), nn.Unflatten(1, (64, 7, 7)),
                        nn.Upsample(scale_factor=4), nn.Conv2d(64, 1, 3, padding=1), nn.Tanh()).to(dev, dtype)
    learner = Learner().to(dev, dtype)
    p0 = {k: v.detach() for k, v in learner.named_parameters()}
    b0 = {k: v.detach() for k, v in learner.named_buffers()}
    lam = {k: v.detach().clone().requires_grad_() for k, v in gen.named_parameters()}
    labels = torch.arange(32, device=dev) % 10
    z = torch.cat([torch.randn(32, 64, device=dev, dtype=dtype),
                   nn.functional.one_hot(labels, 10).to(dtype)], 1)
    xv, yv, lr = x[:128].reshape(-1, 1, 28, 28), y[:128], 0.02

    def loss(p, b, xb, yb):
        out, new_b = call(learner, p, b, xb)
        return nn.functional.cross_entropy(out, yb), new_b

    def step(s, h, t):
        g, nb = grad(loss, has_aux=True)(s["p"], s["b"], functional_call(gen, h, (z,)), labels)
        return {"p": {k: s["p"][k] - lr * g[k] for k in g}, "b": nb}

    def step_ag(s, h, t):
        out, nb = loss(s["p"], s["b"], functional_call(gen, h, (z,)), labels)
        g = torch.autograd.grad(out, list(s["p"].values()), create_graph=True)
        return {"p": {k: v - lr * gk for (k, v), gk in zip(s["p"].items(), g, strict=True)}, "b": nb}

    def outer(s, h):
        return loss(s["p"], s["b"], xv, yv)[0]

    def fresh():
        model = copy.deepcopy(learner)
        g = copy.deepcopy(gen)
        for p in g.parameters():
            p.requires_grad_(True)
        return model, g

    def plain() -> dict:
        model = copy.deepcopy(learner)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            with torch.no_grad():
                xb = functional_call(gen, lam, (z,))
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), labels).backward()
            opt.step()
        return {}

    def with_higher() -> dict:
        import higher

        model, g = fresh()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(nn.functional.cross_entropy(fmodel(g(z)), labels))
            out = nn.functional.cross_entropy(fmodel(xv), yv)
            return dict(zip(lam, torch.autograd.grad(out, list(g.parameters())), strict=True))

    def with_torchopt() -> dict:
        import torchopt

        model, g = fresh()
        meta = torchopt.MetaSGD(model, lr=lr)
        for _ in range(steps):
            meta.step(nn.functional.cross_entropy(model(g(z)), labels))
        out = nn.functional.cross_entropy(model(xv), yv)
        return dict(zip(lam, torch.autograd.grad(out, list(g.parameters())), strict=True))

    def ours(st=step, **kw) -> Fn:
        return lambda: hypergrad.unrolled(st, outer, {"p": p0, "b": b0}, lam, steps=steps, **kw).hypergrad

    def with_kit(**kw) -> Fn:  # modules in, as the docs tell users to write it
        def run() -> dict:
            model, g = fresh()  # copies of the learner and the generator (= lam)
            p = hypergrad.problem(
                model, lambda m, gen_, t: nn.functional.cross_entropy(m(gen_(z)), labels),
                lambda m, gen_: nn.functional.cross_entropy(m(xv), yv), hparams=g, lr=lr)
            return hypergrad.unrolled(*p, steps=steps, **kw).hypergrad
        return run

    return {"plain": plain, "bilevel unrolled": ours(), "bilevel checkpointed": ours(checkpoint=True),
            "bilevel unrolled ag": ours(step_ag), "bilevel checkpointed ag": ours(step_ag, checkpoint=True),
            "bilevel kit": with_kit(), "bilevel kit checkpointed": with_kit(checkpoint=True),
            "higher": with_higher, "torchopt OOP": with_torchopt}


PROBLEMS = {"weighting": weighting, "gtn": gtn}


# --------------------------------------------------------------------------- cells
def _flat(g: dict[str, torch.Tensor]) -> list[float]:
    return torch.cat([v.detach().reshape(-1).double().cpu() for v in g.values()]).tolist()


def run_cell(problem: str, method: str, steps: int, reps: int, device: str, q) -> None:
    torch.set_num_threads(1)
    dev = torch.device(device)
    fns = PROBLEMS[problem](dev, torch.float32, steps)
    implicit = "neumann" in method or " cg" in method
    base_fn, fn = fns["plain-step" if implicit else "plain"], fns[method]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base_fn()
    gc.collect()
    base = rss_mib()
    reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    fn()  # first call: its peak is the memory figure
    sync()
    mem = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else peak_mib()) - base

    time_s, ratio = paired(fn, base_fn, reps, sync)
    # agreement: the same method in float64 at T = min(T, 10)
    del fns, fn, base_fn
    gc.collect()
    g64 = _flat(PROBLEMS[problem](dev, torch.float64, min(steps, 10))[method]())
    q.put({"ratio": ratio, "time_s": time_s, "peak_mib": mem, "g64": g64})


def measure(problem: str, method: str, steps: int, reps: int, device: str) -> dict:
    return in_subprocess(run_cell, problem, method, steps, reps, device)


def plan(only: str | None) -> list[tuple[str, str, int]]:
    unrolled = ["bilevel unrolled", "bilevel checkpointed", "bilevel unrolled ag", "bilevel checkpointed ag",
                "bilevel kit", "bilevel kit checkpointed", "higher", "torchopt OOP"]
    cells = [("weighting", m, t) for t in (10, 50, 100) for m in unrolled]
    cells += [("gtn", m, t) for t in (10, 20) for m in unrolled]
    cells += [("weighting", m, 1) for m in ("bilevel neumann", "torchopt neumann", "bilevel cg", "torchopt cg")]
    keep = None if only is None else [o.strip() for o in only.split(",")]
    return [c for c in cells if keep is None or any(o in f"{c[0]} {c[1]} T={c[2]}" for o in keep)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated: run the cells whose 'problem method T=..' "
                    "contains one of these texts (e.g. 'gtn,weighting bilevel unrolled ag')")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, 1 thread, data {mnist(torch.device('cpu'))[2]}, "
          f"{args.reps} paired repetitions")
    rows, ref = [], {}
    print(f"{'problem':<10} {'method':<22} {'T':>4} {'x plain':>8} {'peak MiB':>9} {'agree':>9}")
    for problem, method, t in plan(args.only):
        r = measure(problem, method, t, args.reps, args.device)
        row = {"problem": problem, "method": method, "T": t, **{k: v for k, v in r.items() if k != "g64"}}
        if "g64" in r:
            key = (problem, min(t, 10), "implicit" if t == 1 else "unrolled", method.split()[-1])
            base_key = (problem, min(t, 10), "implicit" if t == 1 else "unrolled",
                        method.split()[-1] if t == 1 else "unrolled")  # vs bilevel unrolled
            if method.startswith("bilevel") and key not in ref:
                ref[key] = r["g64"]
            g, b = torch.tensor(r["g64"]), torch.tensor(ref.get(base_key, r["g64"]))
            row["agree"] = float((g - b).abs().max() / b.abs().max())
        rows.append(row)
        if "error" in row:
            print(f"{problem:<10} {method:<22} {t:>4}  failed: {row['error']}", flush=True)
            continue
        print(f"{problem:<10} {method:<22} {t:>4} {row['ratio']:>7.2f}{'*' if t == 1 else ' '} "
              f"{row['peak_mib']:>9.1f} {row['agree']:>9.1e}", flush=True)
    print("* implicit rows: time in plain-step equivalents (one SGD step = 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
