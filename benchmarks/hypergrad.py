"""Cost of a hypergradient, as a multiple of plain training over the same steps.

    .venv/bin/python benchmarks/hypergrad.py [--quick] [--threads 1] [--device cpu]
    .venv/bin/python benchmarks/hypergrad.py --flops    # matrix-product FLOPs, lr/wd/mom

Problems (fixed seeds, real MNIST if it is cached, else same-shaped random tensors):

* ``weighting``: MLP 784-256-256-10, batch 128, SGD; λ = a per-example weighting net
  (784-16-1, sigmoid) whose weights scale each example's loss (Commentaries Alg. 1).
* ``lr/wd/mom``: the same MLP; λ = 3 scalars (log lr, log wd, logit momentum), for forward mode.
* ``gtn``: a generator (64-d noise + label → 28×28 image) trains a small BatchNorm CNN
  learner for T steps; λ = the generator.

Every cell runs in a fresh subprocess so that its peak resident memory (minus the memory
after setup) is its own. ``plain`` is ordinary training (loss.backward + update) over the
same steps; a cell's ratio is the median of paired ratios, each method run timed back to
back with a plain run in the same process; implicit rows are reported in plain-step
equivalents.

``--flops`` counts, with ``torch.utils.flop_counter.FlopCounterMode``, the matrix-product
FLOPs of one step of each method on ``lr/wd/mom`` (the difference between T = 2 and T = 1,
so the outer loss and one-time checks cancel), as a multiple of one plain step: a floor on
each method's time that no dispatch work can go below.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad

from bilevel import hypergrad
from bilevel.errors import HypergradWarning
from bilevel.functional import call


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def mnist(device: torch.device, n: int = 1280) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from bilevel.data import load_dataset

        ds = load_dataset("mnist")
        x, y, src = ds.train.x[:n].reshape(n, -1), ds.train.y[:n], "MNIST"
    except Exception:  # not fetched: timings do not depend on pixel values
        g = torch.Generator().manual_seed(0)
        x, y, src = torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g), "random"
    return x.to(device), y.to(device), src


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


# --------------------------------------------------------------------------- problems
def weighting_problem(device: torch.device):
    torch.manual_seed(0)
    x, y, _ = mnist(device)
    net, teacher = mlp().to(device), nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)
    p0 = {k: v.detach() for k, v in net.named_parameters()}
    lam = {k: v.detach().clone().requires_grad_() for k, v in teacher.named_parameters()}
    lr = 0.1

    def batch(t: int):
        i = (t * 128) % (x.shape[0] - 128)
        return x[i : i + 128], y[i : i + 128]

    def weighted_loss(p, h, xb, yb):
        w = torch.sigmoid(functional_call(teacher, h, (xb,))).squeeze(-1) * 2
        ce = nn.functional.cross_entropy(functional_call(net, p, (xb,)), yb, reduction="none")
        return (w * ce).mean()

    def step(s, h, t):
        g = grad(weighted_loss)(s, h, *batch(t))
        return {k: s[k] - lr * g[k] for k in s}

    def outer(s, h):
        return nn.functional.cross_entropy(functional_call(net, s, (x[-256:],)), y[-256:])

    def plain(steps: int) -> None:
        model = mlp().to(device)
        model.load_state_dict(p0)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for t in range(steps):
            xb, yb = batch(t)
            with torch.no_grad():
                w = torch.sigmoid(functional_call(teacher, lam, (xb,))).squeeze(-1) * 2
            loss = (w * nn.functional.cross_entropy(model(xb), yb, reduction="none")).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step, outer, p0, lam, plain


def scalar_problem(device: torch.device):
    torch.manual_seed(0)
    x, y, _ = mnist(device)
    net = mlp().to(device)
    p0 = {k: v.detach() for k, v in net.named_parameters()}
    s0 = {"p": p0, "buf": {k: torch.zeros_like(v) for k, v in p0.items()}}
    lam = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in
           (("log_lr", -1.0), ("log_wd", -4.0), ("logit_m", 0.0))}

    def batch(t: int):
        i = (t * 128) % (x.shape[0] - 128)
        return x[i : i + 128], y[i : i + 128]

    def loss(p, xb, yb):
        return nn.functional.cross_entropy(functional_call(net, p, (xb,)), yb)

    def step(s, h, t):
        g = grad(loss)(s["p"], *batch(t))
        lr, wd, mu = 10 ** h["log_lr"], 10 ** h["log_wd"], torch.sigmoid(h["logit_m"])
        buf = {k: mu * s["buf"][k] + g[k] + wd * s["p"][k] for k in g}
        return {"p": {k: s["p"][k] - lr * buf[k] for k in g}, "buf": buf}

    def outer(s, h):
        return loss(s["p"], x[-256:], y[-256:])

    def plain(steps: int) -> None:
        model = mlp().to(device)
        model.load_state_dict(p0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, weight_decay=1e-4)
        for t in range(steps):
            xb, yb = batch(t)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    return step, outer, s0, lam, plain


class Learner(nn.Module):
    """A small BatchNorm CNN (the GTN learner's shape, narrower)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.LeakyReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def gtn_problem(device: torch.device):
    torch.manual_seed(0)
    x, y, _ = mnist(device)
    gen = nn.Sequential(nn.Linear(74, 64 * 7 * 7), nn.LeakyReLU(), nn.Unflatten(1, (64, 7, 7)),
                        nn.Upsample(scale_factor=4), nn.Conv2d(64, 1, 3, padding=1), nn.Tanh()).to(device)
    learner = Learner().to(device)
    p0 = {k: v.detach() for k, v in learner.named_parameters()}
    b0 = {k: v.detach() for k, v in learner.named_buffers()}
    lam = {k: v.detach().clone().requires_grad_() for k, v in gen.named_parameters()}
    noise = torch.randn(32, 64, device=device)
    labels = torch.arange(32, device=device) % 10
    z = torch.cat([noise, nn.functional.one_hot(labels, 10).float()], 1)

    def synth(h, t):
        return functional_call(gen, h, (z,))

    def loss(p, b, xb, yb):
        out, new_b = call(learner, p, b, xb)  # BatchNorm policy: batch statistics, cloned buffers
        return nn.functional.cross_entropy(out, yb), new_b

    def step(s, h, t):
        g, nb = grad(loss, has_aux=True)(s["p"], s["b"], synth(h, t), labels)
        return {"p": {k: s["p"][k] - 0.02 * g[k] for k in g}, "b": nb}

    def outer(s, h):
        xb = x[:128].reshape(-1, 1, 28, 28)
        return loss(s["p"], s["b"], xb, y[:128])[0]

    def plain(steps: int) -> None:
        model = Learner().to(device)
        model.load_state_dict({**p0, **b0})
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        for t in range(steps):
            with torch.no_grad():
                xb = synth(lam, t)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), labels).backward()
            opt.step()

    return step, outer, {"p": p0, "b": b0}, lam, plain


PROBLEMS = {"weighting": weighting_problem, "lr/wd/mom": scalar_problem, "gtn": gtn_problem}


# --------------------------------------------------------------------------- cells
def run_cell(problem: str, mode: str, steps: int, reps: int, device: str, threads: int, q) -> None:
    torch.set_num_threads(threads)
    # implicit rows run at the initial weights, not a fixed point, on purpose (timing only)
    warnings.simplefilter("ignore", HypergradWarning)
    dev = torch.device(device)
    step, outer, s0, lam, plain = PROBLEMS[problem](dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn: Callable[[], object]
    if mode == "plain":
        fn = lambda: plain(steps)  # noqa: E731
    elif mode == "plain-step":
        fn = lambda: plain(1)  # noqa: E731
    elif mode.startswith("implicit"):
        k = int(mode.split("K=")[1])
        # K = 20 damped (alpha 0.25): at these initial weights the curvature is partly
        # negative, so the undamped series grows and its growth check stops it (correctly).
        # Damped, all 20 terms run, each with one elementwise blend more.
        a = 0.25 if k > 5 else 1.0
        fn = lambda: hypergrad.implicit(step, outer, s0, lam, solver="neumann", terms=k + 1, alpha=a)  # noqa: E731
    else:
        kw = {"unrolled": {}, "truncated": {"truncate": max(1, steps // 10)},
              "checkpointed": {"checkpoint": True}}.get(mode)
        if mode == "forward":
            fn = lambda: hypergrad.forward(step, outer, s0, lam, steps=steps)  # noqa: E731
        else:
            fn = lambda: hypergrad.unrolled(step, outer, s0, lam, steps=steps, **kw)  # noqa: E731
    import gc

    gc.collect()
    base = rss_mib()
    reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn()  # first call: its peak is the memory figure
    sync()
    mem = (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else peak_mib() - base
    plain_fn = (lambda: plain(1)) if mode.startswith("implicit") else (lambda: plain(steps))
    plain_fn()
    time_s, ratio = paired(fn, plain_fn, reps, sync)
    q.put({"time": time_s, "ratio": ratio, "mem": mem})


def paired(fn: Callable[[], object], base_fn: Callable[[], object], reps: int,
           sync: Callable[[], object]) -> tuple[float, float]:
    """``(median time of fn, median of fn/base_fn ratios)`` over ``reps`` pairs run back to
    back in this process, the order alternating: ratios of neighbouring runs cancel most of
    the machine's drift, which a ratio of two separately taken medians does not."""

    def timed(f: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - t0

    times, ratios = [], []
    for i in range(reps):
        if i % 2:
            tm, tp = timed(fn), timed(base_fn)
        else:
            tp, tm = timed(base_fn), timed(fn)
        times.append(tm)
        ratios.append(tm / tp)
    return statistics.median(times), statistics.median(ratios)


def in_subprocess(target: Callable[..., None], *args: Any) -> dict:
    """Run ``target(*args, q)`` in a fresh spawned process and return what it puts on ``q``,
    or ``{"error": ...}`` if the process dies first (a crashed cell is reported, not awaited
    forever)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                out = {"error": f"exit code {p.exitcode}"}
                break
    p.join()
    return out


def measure(problem: str, mode: str, steps: int, args: argparse.Namespace) -> dict:
    return in_subprocess(run_cell, problem, mode, steps, args.reps, args.device, args.threads)


def flops_per_step() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    step, outer, s0, lam, plain = scalar_problem(torch.device("cpu"))

    def count(fn: Callable[[int], object], steps: int) -> int:
        with FlopCounterMode(display=False) as fc:
            fn(steps)
        return fc.get_total_flops()

    methods: dict[str, Callable[[int], object]] = {
        "plain": plain,
        "unrolled": lambda t: hypergrad.unrolled(step, outer, s0, lam, steps=t),
        "forward": lambda t: hypergrad.forward(step, outer, s0, lam, steps=t),
    }
    per_step = {m: count(f, 2) - count(f, 1) for m, f in methods.items()}
    print("lr/wd/mom (3 scalars), matrix-product FLOPs of one inner step")
    for m, f in per_step.items():
        print(f"{m:<10} {f / 1e6:9.1f} MFLOP  {f / per_step['plain']:5.2f} x plain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T=10 only, one repetition")
    ap.add_argument("--flops", action="store_true", help="count matrix-product FLOPs per step, then stop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.flops:
        flops_per_step()
        return
    if args.quick:
        args.reps = 1
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, data {mnist(torch.device('cpu'))[2]}")
    rows = []
    unroll_t = [10] if args.quick else [10, 50, 100]
    plan = [("weighting", m, t) for t in unroll_t for m in ("unrolled", "truncated", "checkpointed")]
    plan += [("lr/wd/mom", m, t) for t in unroll_t for m in ("unrolled", "forward")]
    plan += [("weighting", f"implicit K={k}", 1) for k in (1, 5, 20)]
    plan += [("gtn", m, t) for t in ([10] if args.quick else [10, 20]) for m in ("unrolled", "checkpointed")]
    plain_cache: dict[tuple[str, int], dict] = {}
    print(f"{'problem':<10} {'method':<14} {'T':>4} {'time s':>8} {'x plain':>8} {'peak MiB':>9} {'plain MiB':>9}")
    for problem, mode, t in plan:
        key = (problem, t) if not mode.startswith("implicit") else (problem, 0)
        if key not in plain_cache:
            plain_cache[key] = measure(problem, "plain" if t and key[1] else "plain-step", t, args)
        base = plain_cache[key]
        r = measure(problem, mode, t, args)
        if "error" in r or "error" in base:
            print(f"{problem:<10} {mode:<14} {t:>4}  failed: {r.get('error') or base['error']}", flush=True)
            continue
        ratio = r["ratio"]
        label = "step-eq" if mode.startswith("implicit") else "x plain"
        row = {"problem": problem, "method": mode, "T": t, "time_s": r["time"], "ratio": ratio,
               "ratio_kind": label, "peak_mib": r["mem"], "plain_peak_mib": base["mem"]}
        rows.append(row)
        print(f"{problem:<10} {mode:<14} {t:>4} {r['time']:>8.3f} {ratio:>7.2f}{'*' if label == 'step-eq' else ' '}"
              f" {r['mem']:>9.1f} {base['mem']:>9.1f}", flush=True)
    print("* implicit rows: time in plain-step equivalents (one SGD step = 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
