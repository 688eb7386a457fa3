"""Data-parallel hypergradients on scikit-learn's diabetes data (run by test_gloo.py).

    torchrun --standalone --nproc_per_node=2 tests/parallel/_dp_hypergrad.py OUT_DIR

Each rank trains a tanh MLP on its half of 400 training rows (full-batch SGD with learned
``log10 lr`` and ``log10 wd``) and computes ``hypergrad.unrolled`` (8 steps) and
``hypergrad.one_pass`` of the full validation MSE; inner gradients go through
``bilevel.parallel.all_reduce_mean`` and hypergradients through ``average_tree``. Writes
``rank{r}.pt`` with the averaged hypergradients, plus the *local* ones and a ``naive``
variant that skips the inner all-reduce (what DDP would give ``autograd.grad``).
With no torchrun environment it runs the single-process full-batch reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_diabetes

from bilevel import hypergrad, parallel


def problem(*, sync: bool):
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x[:442], dtype=torch.float64) * 10
    y = torch.tensor(y[:442], dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    xt, yt, xv, yv = x[:400], y[:400], x[400:], y[400:]
    part = parallel.shard(400)
    xs, ys = xt[part], yt[part]
    g = torch.Generator().manual_seed(0)
    w0 = {"w1": torch.randn(10, 16, generator=g, dtype=torch.float64) * 0.3,
          "w2": torch.randn(16, generator=g, dtype=torch.float64) * 0.3}
    w0 = parallel.broadcast_tree(w0)

    def loss(w, xb, yb):
        return ((torch.tanh(xb @ w["w1"]) @ w["w2"] - yb) ** 2).mean()

    def step(w, h, t):
        grads = torch.func.grad(loss)(w, xs, ys)
        if sync:
            grads = parallel.all_reduce_mean(grads)
        lr, wd = 10 ** h["log_lr"], 10 ** h["log_wd"]
        return {k: w[k] - lr * (grads[k] + wd * w[k]) for k in w}

    def outer(w, h):
        return loss(w, xv, yv)

    hp = {"log_lr": torch.tensor(-1.0, dtype=torch.float64, requires_grad=True),
          "log_wd": torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)}
    return step, outer, w0, hp


def main(out: Path) -> None:
    rank, world = parallel.init_from_env()
    result = {}
    for sync in (True, False):
        step, outer, w0, hp = problem(sync=sync)
        un = hypergrad.unrolled(step, outer, w0, hp, steps=8)
        op = hypergrad.one_pass(step, outer, un.state, hp, terms=5, start=8)
        tag = "" if sync else "naive_"
        result[tag + "local_unrolled"] = {k: v.detach() for k, v in un.hypergrad.items()}
        result[tag + "unrolled"] = parallel.average_tree(result[tag + "local_unrolled"])
        result[tag + "one_pass"] = parallel.average_tree(
            {k: v.detach() for k, v in op.hypergrad.items()})
        result[tag + "state"] = un.state
    result["world"] = world
    torch.save(result, out / f"rank{rank}.pt")
    parallel.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Skip interpreter finalisation: under load, gloo's C++ threads have (rarely) aborted the
    # process there ("terminate called without an active exception"), after the result was
    # saved and the group destroyed. Nothing is left to flush or close.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
