"""Seconds per outer step and peak memory of the GTN recipe, with and without checkpointing.

    .venv/bin/python benchmarks/gtn.py [--steps 12] [--out runs/bench-gtn]

Runs the shipped Experiment C (10 inner steps x batch 16) and B (10 x 32) configs through the
real CLI for a few outer steps each, once with the plain unrolled hypergradient and once
with ``hypergrad.method: checkpointed``, and prints the median seconds per outer step (first
two steps dropped: warm-up) and the run's peak resident memory, both as logged by the recipe
(``time/outer_s``, ``sys/peak_rss_mb``). Needs ``bilevel data fetch mnist``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(config: str, method: str, steps: int, out: Path) -> dict[str, float]:
    subprocess.run(
        [sys.executable, "-m", "bilevel", "run", config, "--out", str(out),
         "--set", f"run.max_steps={steps}", "--set", f"hypergrad.method={method}",
         "--set", "eval.every=100000", "--set", "eval.images_every=100000",
         "--set", "logging.progress=false"],
        check=True, capture_output=True, text=True,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time/outer_s"] for r in rows if "time/outer_s" in r][2:]
    peak = max(r["sys/peak_rss_mb"] for r in rows if "sys/peak_rss_mb" in r)
    return {"s_per_step": statistics.median(times), "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="runs/bench-gtn")
    args = ap.parse_args()
    root = Path(args.out)
    print(f"{'experiment':<12} {'method':<13} {'s/outer step':>12} {'peak MiB':>9}")
    for name, config in (("C (10x16)", "gtn/mnist_c_learned.yaml"), ("B (10x32)", "gtn/mnist_b_learned.yaml")):
        for method in ("unrolled", "checkpointed"):
            out = root / f"{config.split('/')[1][:-5]}-{method}"
            if out.exists():
                raise SystemExit(f"{out} exists: pass another --out")
            r = run(config, method, args.steps, out)
            print(f"{name:<12} {method:<13} {r['s_per_step']:>12.3f} {r['peak_mib']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
