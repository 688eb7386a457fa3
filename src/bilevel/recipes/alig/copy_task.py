"""The alig recipe on the DNC repeat-copy task (AliG's "no tuning" experiment, seeds.md §6).

A :class:`~bilevel.models.DNC` (64-unit LSTM controller, 16×16 memory, 4 read heads, one
write head) learns the repeat-copy task (4 bits, patterns of 1–2 vectors, 1–2 repeats,
batch ``data.batch_size``, 16 in the paper) from a fresh batch each step, drawn from a
generator seeded with ``run.seed``. The objective is :func:`~bilevel.data.repeat_copy_loss`
(masked sigmoid cross-entropy, summed over bits and steps, mean over the batch; 0 for a
perfect copier). The authors' protocol: AliG with ``eps: 0`` and no gradient clipping, the
baselines with ``optim.clip_grad_norm: 50``.

Reported at the end (what ``bilevel alig sweep`` plots):

* ``train/loss``: the final training objective, the mean minibatch loss of the last
  :data:`TAIL` steps (the authors log the mean over their last report interval of 100);
* ``test/loss``, ``test/accuracy``: on :data:`EVAL_BATCHES` held-out batches from a
  generator seeded with ``EVAL_SEED + data.split_seed`` (accuracy: the fraction of
  sequences with every scored bit right);
* ``weights/norm``; ``train/diverged_step`` if the loss became non-finite.

Every ``logging.every`` steps: ``train/batch_loss`` (window mean), ``optim/lr`` and AliG's
step sizes, as for the classifiers; every ``eval.every`` steps the held-out metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bilevel.data import RepeatCopy, repeat_copy_accuracy, repeat_copy_loss
from bilevel.models import DNC
from bilevel.optim import AliG
from bilevel.run import RunDir, RunState, on_nonfinite, resolve_device
from bilevel.run.faults import kill_point

if TYPE_CHECKING:
    from bilevel.recipes.alig.recipe import Config

TAIL = 100  # steps averaged into the final training objective
EVAL_BATCHES = 20  # held-out batches per evaluation
EVAL_SEED = 1_000_003  # + data.split_seed: the held-out stream, apart from run.seed's


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Any]) -> dict[str, float]:
    """Mean held-out objective and sequence accuracy, and the weight norm."""
    losses, accs = [], []
    for b in batches:
        logits = model(b.observations)
        losses.append(repeat_copy_loss(logits, b.target, b.mask))
        accs.append(repeat_copy_accuracy(logits, b.target, b.mask))
    norm = torch.cat([p.reshape(-1) for p in model.parameters()]).norm()
    return {"test/loss": torch.stack(losses).mean().item(),
            "test/accuracy": torch.stack(accs).mean().item(), "weights/norm": norm.item()}


def run_repeat_copy(config: Config, run_dir: RunDir) -> dict[str, float]:
    """Train the DNC for ``run.max_steps`` steps; return the final metrics."""
    from bilevel.recipes.alig.recipe import _clipped, build_optimizer, log_window

    device = resolve_device(config.run.device)
    task = RepeatCopy(batch_size=config.data.batch_size, seed=config.run.seed, device=device)
    held = RepeatCopy(batch_size=config.data.batch_size, device=device,
                      seed=EVAL_SEED + config.data.split_seed)
    held_out = [next(held) for _ in range(EVAL_BATCHES)]
    model = DNC(task.input_size, task.target_size).to(device)  # initialised from run.seed
    opt = build_optimizer(config.optim, model)
    alig_opt = opt if isinstance(opt, AliG) else None
    clip = config.optim.clip_grad_norm
    window = torch.zeros(3, dtype=torch.float64)  # [loss sum, steps, clipped steps] since the last log
    tail = torch.full((TAIL,), float("nan"), dtype=torch.float64)  # the last TAIL losses

    state = RunState(model=model, optim=opt, task=task, window=window, tail=tail)
    start, T = run_dir.resume(state), config.run.max_steps
    diverged = None
    for step in run_dir.steps(start, T):
        batch = next(task)
        kill_point("inner")  # crash tests (BILEVEL_FAULT=inner@n); a no-op otherwise
        loss = repeat_copy_loss(model(batch.observations), batch.target, batch.mask)
        if not torch.isfinite(loss):
            on_nonfinite(run_dir, config.run.nan_policy, step=step, what="training loss")
            diverged = step  # skip: the weights blew up and cannot recover
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if alig_opt is not None:
            alig_opt.step(loss=loss.detach())
        else:
            opt.step()
        value = loss.item()
        tail[step % TAIL] = value
        window += torch.tensor([value, 1.0, float(_clipped(alig_opt))], dtype=torch.float64)

        if step % config.logging.every == 0 or step == T:
            log_window(run_dir, step, window, opt, alig_opt)
        if step % config.eval.every == 0 and step != T:
            run_dir.log(step, evaluate(model, held_out))
        run_dir.checkpoint(step, state, force=step == T)

    final = evaluate(model, held_out)
    final["train/loss"] = tail.nanmean().item()
    if diverged is not None or not torch.isfinite(torch.tensor(final["test/loss"])):
        final |= {"train/loss": float("nan"), "train/diverged_step": float(diverged or T)}
        run_dir.event(diverged or T, "diverged", what="training loss")
    run_dir.log(diverged or T, final)
    return final
