"""Wall-clock cost of Clarke et al.'s one-pass algorithms, as a multiple of Random on the same runs.

    .venv/bin/python benchmarks/onepass.py [--quick] [--threads 1] [--device auto] \\
        [--reps 5] [--weight-steps 500] [--warmup 50] [--block 50] \\
        [--problems energy kin8nm mnist] [--json PATH]

Every row runs the ``onepass`` recipe's own training loop (``ALGORITHMS[name]`` hyper-step by
hyper-step, then the outer optimiser step and the ``log10 lr`` clip, as
:func:`bilevel.recipes.onepass.recipe.run` does), with the settings of the shipped algorithm YAMLs,
and nothing else: no evaluation, logging or checkpointing. Within a problem every row starts
from the same data, the same initial weights (``run.seed``), the same initial hyperparameters
(``--lr``, ``--wd``, ``--momentum``) and the same sampler state, and is timed over the same
number of *weight* steps (Baydin makes one weight step per hyper-step, the others ten).

Random is timed on the training split like the others (``algorithm.train_on_val`` is forced
off): its shipped config trains on train+validation, which for a full-batch UCI run would
make its batch, and so its step, larger.

Problems: ``energy`` (UCI Energy, full batch of 614 rows, MLP 8-50-1), ``kin8nm`` (UCI Kin8nm,
full batch of 5898 rows, MLP 8-50-1), ``mnist`` (MNIST, batch 50, MLP 784-50-10:
``onepass/mnist.yaml``, the demo's setting and the paper's Fashion-MNIST one).

Each repeat (a *round*) starts a fresh run of every algorithm on every problem, warms each
up for ``--warmup`` weight steps, then times ``--weight-steps`` of them in blocks of
``--block``, the algorithms taking turns block by block (in an order rotated from round to
round), so that background load falls on every row alike. Reported per problem and
algorithm: the median over rounds of wall-clock ms per weight step; ``× Random``, the median
over rounds of the ratio to Random's time in the same round, and its range over rounds; and
the median time and ratio in process CPU time (what the process itself used: less disturbed by
a loaded machine than the wall clock, though not immune to shared caches and cores).
On CUDA the clocks are read after ``torch.cuda.synchronize()`` and
the peak memory allocated on top of what the block started with is reported too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bilevel.recipes import resolve
from bilevel.recipes.onepass.recipe import (
    ALGORITHMS,
    Config,
    Inner,
    Task,
    build_task,
    hyper_update,
    hyperparameters,
    outer_optimizer,
)
from bilevel.run import resolve_device
from bilevel.run.seeding import seed_everything
from bilevel.tree import tree_all_finite

#: problem -> (data config, overrides that make it this problem)
PROBLEMS: dict[str, tuple[str, list[str]]] = {
    "energy": ("onepass/uci_energy.yaml", []),
    "kin8nm": ("onepass/uci_kin8nm.yaml", []),
    "mnist": ("onepass/mnist.yaml", []),
}
#: row label -> shipped algorithm config; the first row is the baseline
ALGOS: dict[str, str] = {
    "random": "onepass/random.yaml",
    "lorraine": "onepass/lorraine.yaml",
    "baydin": "onepass/baydin.yaml",
    "ours_wd_lr": "onepass/ours_wd_lr.yaml",
    "ours_wd_lr_m": "onepass/ours_wd_lr_m.yaml",
    "ours_wd_hdlr_m": "onepass/ours_wd_hdlr_m.yaml",
    "diff_through_opt": "onepass/diff_through_opt.yaml",
}


@dataclass
class Problem:
    """One data set: the task built once, the state every cell starts from, and the times."""

    name: str
    configs: dict[str, Config]
    task: Task
    w0: dict[str, torch.Tensor]
    task_state: dict[str, Any]
    wall: dict[str, list[float]] = field(default_factory=dict)  # algorithm -> s / weight step
    cpu: dict[str, list[float]] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    diverged: set[str] = field(default_factory=set)


def load_problem(name: str, args: argparse.Namespace, device: torch.device) -> Problem:
    data_cfg, extra = PROBLEMS[name]
    overrides = [*extra, f"inner.lr={args.lr}", f"inner.weight_decay={args.wd}",
                 f"inner.momentum={args.momentum}", "algorithm.train_on_val=false",
                 f"run.seed={args.seed}"]
    configs = {}
    for algo, algo_cfg in ALGOS.items():
        cfg = resolve([data_cfg, algo_cfg], overrides)[1]
        assert isinstance(cfg, Config)
        configs[algo] = cfg
    first = configs["random"]
    seed_everything(args.seed)  # as a run does before building its task: same initial weights
    task = build_task(first.data, first.model, train_on_val=False, seed=args.seed, device=device)
    w0 = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    return Problem(name, configs, task, w0, copy.deepcopy(task.state_dict()))


class Cell:
    """One algorithm's run on one problem, from the problem's initial state.

    The task is shallow-copied (data and model shared, samplers and buffers its own), so that
    every algorithm's run of a round can be alive at once and advanced a block at a time.
    """

    def __init__(self, prob: Problem, algo: str, device: torch.device) -> None:
        cfg = prob.configs[algo]
        self.a = a = cfg.algorithm
        task = dataclasses.replace(prob.task, samplers=copy.deepcopy(prob.task.samplers))
        task.load_state_dict(copy.deepcopy(prob.task_state))
        self.hp = hp = hyperparameters(cfg, prob.w0).to(device)
        self.inner = Inner(task, hp, dict(prob.w0),
                           {k: torch.zeros_like(v) for k, v in prob.w0.items()}, cfg.inner.grad_clip)
        self.outer = outer_optimizer(hp, a)
        self.hyper_step = ALGORITHMS[a.name]
        self.diverged = False

    def run(self, weight_steps: int) -> None:
        """As many hyper-steps as make ``weight_steps`` weight steps (at least one)."""
        a = self.a
        for _ in range(max(1, weight_steps // a.weight_steps)):
            hg, _ = self.hyper_step(self.inner, weight_steps=a.weight_steps, terms=a.terms,
                                    lookback=a.lookback)
            if not bool(tree_all_finite(self.inner.w)):  # run() would stop; we flag the row
                self.diverged = True
            hyper_update(self.hp, self.outer, hg, nan_policy="skip", step=0)


def one_round(prob: Problem, order: list[str], args: argparse.Namespace, device: torch.device
              ) -> None:
    """Fresh runs of every algorithm, warmed up, then timed block by block in turn."""
    cuda = device.type == "cuda"
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    cells = {algo: Cell(prob, algo, device) for algo in order}
    for algo in order:
        cells[algo].run(args.warmup)
    wall = dict.fromkeys(order, 0.0)
    cpu = dict.fromkeys(order, 0.0)
    steps = dict.fromkeys(order, 0)
    gc.collect()
    for _ in range(max(1, args.weight_steps // args.block)):
        for algo in order:
            cell = cells[algo]
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0, c0, n0 = time.perf_counter(), time.process_time(), cell.inner.t
            cell.run(args.block)
            sync()
            wall[algo] += time.perf_counter() - t0
            cpu[algo] += time.process_time() - c0
            steps[algo] += cell.inner.t - n0
            if cuda:
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                prob.peak_mib[algo] = max(peak, prob.peak_mib.get(algo, 0.0))
    for algo in order:
        prob.wall.setdefault(algo, []).append(wall[algo] / steps[algo])
        prob.cpu.setdefault(algo, []).append(cpu[algo] / steps[algo])
        if cells[algo].diverged:
            prob.diverged.add(algo)


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median ms per weight step, and the median, least and greatest over rounds of the
    same-round ratio to Random."""
    base = times["random"]
    out = {}
    for algo, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        out[algo] = {"ms": 1e3 * statistics.median(ts), "x_random": statistics.median(ratios),
                     "x_min": min(ratios), "x_max": max(ratios)}
    return out


def print_table(problems: list[Problem], cuda: bool) -> None:
    cols = ["problem", "algorithm", "ms / weight step", "× Random", "× Random range",
            "CPU ms / weight step", "CPU × Random"] + (["peak MiB"] if cuda else [])
    print("| " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * (len(cols) - 2))
    for p in problems:
        wall, cpu = summarise(p.wall), summarise(p.cpu)
        for algo in ALGOS:
            w, c = wall[algo], cpu[algo]
            flag = " (diverged)" if algo in p.diverged else ""
            cells = [p.name, algo + flag, f"{w['ms']:.3f}", f"{w['x_random']:.2f}",
                     f"{w['x_min']:.2f}–{w['x_max']:.2f}", f"{c['ms']:.3f}", f"{c['x_random']:.2f}"]
            if cuda:
                cells.append(f"{p.peak_mib.get(algo, float('nan')):.1f}")
            print("| " + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 40 weight steps after 10 of warm-up, one repeat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--weight-steps", type=int, default=500, help="timed weight steps per cell")
    ap.add_argument("--warmup", type=int, default=50, help="untimed weight steps per cell first")
    ap.add_argument("--block", type=int, default=50,
                    help="weight steps an algorithm runs before the next one takes its turn")
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every cell's times to this file")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.weight_steps, args.warmup, args.block = 1, 40, 10, 20
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {args.threads}, "
          f"{args.weight_steps} timed weight steps after {args.warmup} of warm-up, {args.reps} repeats; "
          f"initial lr {args.lr:g}, wd {args.wd:g}, momentum {args.momentum:g}, seed {args.seed}",
          flush=True)
    problems = [load_problem(name, args, device) for name in args.problems]
    algos = list(ALGOS)
    for rep in range(args.reps):
        order = algos[rep % len(algos):] + algos[: rep % len(algos)]  # rotate: no row always first
        for prob in problems:
            one_round(prob, order, args, device)
        print(f"repeat {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    print()
    print_table(problems, device.type == "cuda")
    if args.json:
        rows = [{"problem": p.name, "algorithm": a, "wall_s_per_weight_step": p.wall[a],
                 "cpu_s_per_weight_step": p.cpu[a], "wall": summarise(p.wall)[a],
                 "cpu": summarise(p.cpu)[a], "peak_mib": p.peak_mib.get(a),
                 "diverged": a in p.diverged}
                for p in problems for a in ALGOS]
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "device": str(device),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
