"""Time and peak memory of the long-horizon hypergradients: reversible vs unrolled vs
checkpointed vs forward, through T = 100, 1000, 10000 steps of SGD with momentum.

    .venv/bin/python benchmarks/reversible.py [--steps 100 1000 10000] [--max-mib 3000] [--methods ...]

The problem: an MLP 64-32-10 (2410 weights, float64) on scikit-learn's digits, minibatch 20,
SGD with momentum 0.9 and a learned log learning rate and momentum (2 scalars, so forward
mode is in its element). Every (method, T) runs in a fresh process: CPU seconds of the call
(process time, robust on a shared machine), wall seconds, and peak resident memory above the
level just before the call (VmHWM reset through /proc/self/clear_refs; Linux). The
hypergradient is compared with unrolled's (checkpointed's where unrolled is skipped). A
configuration whose memory, extrapolated linearly from the previous T, would exceed
``--max-mib`` is skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("unrolled", "checkpointed", "forward", "reversible")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def one(method: str, steps: int) -> dict[str, Any]:
    """Run one configuration in this process; return its measurements."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.func import grad

    from bilevel import hypergrad

    torch.set_num_threads(1)
    x, y = (torch.tensor(a) for a in load_digits(return_X_y=True))
    x = x.double() / 16
    xt, yt, xv, yv = x[:1000], y[:1000], x[1000:1400], y[1000:1400]
    g = torch.Generator().manual_seed(0)
    w0 = {"l1": 0.1 * torch.randn(64, 32, generator=g, dtype=torch.float64), "b1": torch.zeros(32, dtype=torch.float64),
          "l2": 0.1 * torch.randn(32, 10, generator=g, dtype=torch.float64), "b2": torch.zeros(10, dtype=torch.float64)}

    def net(w: dict, xb: torch.Tensor) -> torch.Tensor:
        return torch.tanh(xb @ w["l1"] + w["b1"]) @ w["l2"] + w["b2"]

    def loss_fn(w: dict, h: dict, t: int) -> torch.Tensor:
        i = slice(20 * t % 1000, 20 * t % 1000 + 20)
        return F.cross_entropy(net(w, xt[i]), yt[i])

    def outer(w: dict, h: dict) -> torch.Tensor:
        return F.cross_entropy(net(w, xv), yv)

    def step(s: dict, h: dict, t: int) -> dict:  # the same update for the step-map methods
        gw = grad(lambda w: loss_fn(w, h, t))(s["w"])
        v = {k: torch.sigmoid(h["logit_m"]) * s["v"][k] + gw[k] for k in gw}
        return {"w": {k: s["w"][k] - 10 ** h["log_lr"] * v[k] for k in v}, "v": v}

    h = {"log_lr": torch.tensor(-1.5, dtype=torch.float64, requires_grad=True),
         "logit_m": torch.tensor(2.0, dtype=torch.float64, requires_grad=True)}  # γ = 0.88
    s0 = {"w": w0, "v": {k: torch.zeros_like(p) for k, p in w0.items()}}

    def call(n: int) -> Any:
        if method == "reversible":
            return hypergrad.reversible(loss_fn, outer, w0, h, steps=n, lr=lambda hp, t: 10 ** hp["log_lr"],
                                        momentum=lambda hp, t: torch.sigmoid(hp["logit_m"]))
        so = lambda s, hp: outer(s["w"], hp)  # noqa: E731
        if method == "forward":
            return hypergrad.forward(step, so, s0, h, steps=n)
        return hypergrad.unrolled(step, so, s0, h, steps=n, checkpoint=method == "checkpointed")

    call(3)  # warm-up: lazy imports, first-call allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    c0, w0_ = time.process_time(), time.perf_counter()
    r = call(steps)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0_
    out = {"method": method, "steps": steps, "cpu_s": cpu, "wall_s": wall,
           "peak_mib": (_rss_kib("VmHWM") - before) / 1024,
           "hypergrad": {k: float(v) for k, v in r.hypergrad.items()}}
    if method == "reversible":
        out["buffer_mib"] = r.info["buffer_bytes"] / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--max-mib", type=float, default=3000.0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    rows: list[dict[str, Any]] = []
    print(f"{'T':>6} {'method':<13} {'CPU s':>8} {'wall s':>8} {'peak MiB':>9} {'rel. diff':>9}  note")
    for steps in args.steps:
        ref = None
        for method in args.methods:
            prev = [r for r in rows if r["method"] == method]
            if prev and prev[-1]["peak_mib"] * steps / prev[-1]["steps"] > args.max_mib:
                print(f"{steps:>6} {method:<13} {'skipped: memory extrapolates past --max-mib':>40}", flush=True)
                continue
            proc = subprocess.run([sys.executable, __file__, "--one", method, str(steps)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            ref = ref or r["hypergrad"]
            diff = max(abs(r["hypergrad"][k] - ref[k]) / abs(ref[k]) for k in ref)
            note = f"buffer {r['buffer_mib']:.2f} MiB" if "buffer_mib" in r else ""
            print(f"{steps:>6} {method:<13} {r['cpu_s']:>8.2f} {r['wall_s']:>8.2f} {r['peak_mib']:>9.1f} "
                  f"{diff:>9.1e}  {note}", flush=True)


if __name__ == "__main__":
    main()
