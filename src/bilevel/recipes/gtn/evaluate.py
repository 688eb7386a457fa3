"""Evaluation of finished GTN runs: the shuffle test and accuracy curves across variants.

    bilevel gtn shuffle-test runs/gtn/c_learned --learners 100
    bilevel gtn plot runs/gtn/c_* --labels learned random_fixed random --out acc.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.errors import CheckpointError
from bilevel.recipes.gtn.plots import accuracy_curves, shuffle_boxplot
from bilevel.recipes.gtn.recipe import (
    Config,
    build_learner,
    build_teacher,
    load_images,
    test_accuracy,
    train_learner,
)
from bilevel.recipes.gtn.teacher import shuffled_order
from bilevel.run import CheckpointStore, load_layers, read_metrics, resolve_device, validate

# ---------------------------------------------------------------- shuffle test


def shuffle_test(run_path: str | Path, *, learners: int = 100, test_size: int | None = None,
                 seed: int = 0, step: int | None = None,
                 out: str | Path | None = None) -> dict[str, Any]:
    """Train fresh learners on a finished run's curriculum, in order and with steps shuffled.

    Learner ``i`` starts from the same initial weights in both arms (a paired comparison);
    the shuffled arm shows curriculum step ``order[t]`` at inner step ``t``, a non-identity
    permutation drawn per learner (:func:`bilevel.recipes.gtn.teacher.shuffled_order`). For the
    ``random`` curriculum each learner gets its own fresh noise, shared by both arms.

    Writes ``shuffle.json`` (accuracies, permutations, medians and quartiles) and
    ``shuffle.png`` (box plot) into ``out`` (default: the run directory). The teacher is the
    run's latest checkpoint, or the checkpoint of outer step ``step`` (keep it with
    ``checkpoint.keep_last``).

    Returns:
        The contents of ``shuffle.json``.
    """
    run_path = Path(run_path)
    config = validate(Config, load_layers([run_path / "config.yaml"]), ignore=("recipe",))
    store = CheckpointStore(run_path / "checkpoints")
    if step is None:
        found = store.load_latest(report=print)
        if found is None:
            raise CheckpointError(f"{run_path}: no checkpoint to take the teacher from; run it first")
        entry, payload = found
    else:
        kept = {e.step: e for e in store.entries()}
        if step not in kept:
            raise CheckpointError(f"{run_path}: no checkpoint of outer step {step} (kept: "
                                  f"{', '.join(map(str, sorted(kept))) or 'none'}); choose one "
                                  "of those, or rerun with checkpoint.every / keep_last that keep it")
        entry = kept[step]
        payload = store.load(entry)
    device = resolve_device(config.run.device)
    data = load_images(config.data, device)
    x_test, y_test = data["test"]
    if test_size is not None:
        x_test, y_test = x_test[:test_size], y_test[:test_size]
    teacher = build_teacher(config, seed=config.run.seed).to(device)
    teacher.load_state_dict(payload["state"]["teacher"])
    learner = build_learner(config).to(device)
    rng = torch.Generator().manual_seed(seed)
    arms: dict[str, list[float]] = {"in order": [], "shuffled": []}
    orders = []
    for i in range(learners):
        drawn = teacher.sample_noise(generator=rng)
        order = shuffled_order(config.hypergrad.steps, generator=rng)
        orders.append(order)
        for arm, o in (("in order", None), ("shuffled", order)):
            state = train_learner(learner, teacher, config, seed=10**9 + seed * learners + i,
                                  drawn=drawn, order=o)
            arms[arm].append(test_accuracy(learner, state, x_test, y_test,
                                           batchnorm=config.eval.batchnorm))
    result = {"run": str(run_path), "outer_step": entry.step, "curriculum": config.teacher.curriculum,
              "learners": learners, "test_size": len(x_test), "seed": seed,
              "summary": {arm: _quartiles(v) for arm, v in arms.items()},
              "accuracy": arms, "orders": orders}
    out_dir = Path(out) if out is not None else run_path
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shuffle.json").write_text(json.dumps(result, indent=1))
    shuffle_boxplot(arms, out_dir / "shuffle.png",
                    title=f"{config.teacher.curriculum}, outer step {entry.step}, {learners} learners")
    return result


def _quartiles(values: list[float]) -> dict[str, float]:
    q1, med, q3 = np.quantile(np.asarray(values), [0.25, 0.5, 0.75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "mean": float(np.mean(values))}


def accuracy_plot(runs: list[str], out: str | Path, *, labels: list[str] | None = None,
                  title: str = "test accuracy") -> Path:
    """Plot ``test/acc`` against outer step for several run directories (one line each)."""
    curves = {}
    for i, path in enumerate(runs):
        records = [r for r in read_metrics(Path(path) / "metrics.jsonl") if "test/acc" in r]
        if labels is not None:
            label = labels[i]
        else:
            cfg = validate(Config, load_layers([Path(path) / "config.yaml"]), ignore=("recipe",))
            label = f"{cfg.teacher.curriculum} ({Path(path).name})"
        curves[label] = ([r["step"] for r in records], [r["test/acc"] for r in records])
    return accuracy_curves(curves, out, title=title)
