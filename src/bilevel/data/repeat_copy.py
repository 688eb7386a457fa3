"""The repeat-copy task (Graves et al. 2016; AliG's DNC experiment), generated on the fly.

Each sequence shows a random binary pattern of ``L`` vectors and asks for it ``R`` times in
a row, then an end marker. With ``num_bits`` bits per vector the observation has two
extra channels (a start marker at step 0; the normalised repeat count ``R / norm_max``
right after the pattern) and the target one (the end marker)::

    step:        0    1..L        L+1      L+2 .. L+1+L·R        L+2+L·R
    observation: go   pattern     R/norm   0                     0
    target:      0    0           0        pattern, R times      end marker
    mask:        0    0           0        1                     1

A sequence lasts ``L·(R+1) + 3`` steps; shorter ones are padded with zeros (mask 0) to the
longest in the batch. ``L`` and ``R`` are uniform on ``[min_length, max_length]`` and
``[min_repeats, max_repeats]`` for each sequence. Tensors are time-major: observations
``[T, B, num_bits + 2]``, targets ``[T, B, num_bits + 1]``, mask ``[T, B]``.

The objective (:func:`repeat_copy_loss`) is the masked sigmoid cross-entropy summed over
bits and steps and averaged over the batch (nats), as in DeepMind's ``dnc`` code that the
AliG authors ran: it is >= 0 and a perfect copier drives it to 0, so AliG's Polyak step
(which assumes an optimum near 0) applies.

Batches come from the generator's own ``torch.Generator`` (never the global RNG), a
fixed number of draws per batch, so ``state_dict``/``load_state_dict`` resume the exact
stream.

Example:
    >>> task = RepeatCopy(num_bits=4, batch_size=16, seed=0)
    >>> batch = next(task)
    >>> batch.observations.shape[1:], batch.target.shape[1:]
    (torch.Size([16, 6]), torch.Size([16, 5]))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class CopyBatch(NamedTuple):
    """One time-major batch of the repeat-copy task."""

    observations: Tensor  # [T, B, num_bits + 2]
    target: Tensor  # [T, B, num_bits + 1]
    mask: Tensor  # [T, B]; 1 where the target is scored


class RepeatCopy:
    """An endless, checkpointable stream of repeat-copy batches.

    Args:
        num_bits: bits per pattern vector (4 in AliG's experiment).
        batch_size: sequences per batch (16).
        min_length, max_length: range of the pattern length ``L`` (1-2).
        min_repeats, max_repeats: range of the repeat count ``R`` (1-2).
        norm_max: the repeat count is shown as ``R / norm_max`` (10, as DeepMind's code).
        seed: seed of the private generator.
        device: where the batches are placed.
    """

    def __init__(self, *, num_bits: int = 4, batch_size: int = 16, min_length: int = 1,
                 max_length: int = 2, min_repeats: int = 1, max_repeats: int = 2,
                 norm_max: float = 10.0, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if num_bits < 1 or batch_size < 1:
            raise ValueError(f"num_bits and batch_size must be >= 1, got {num_bits}, {batch_size}")
        if not 1 <= min_length <= max_length or not 1 <= min_repeats <= max_repeats:
            raise ValueError(f"need 1 <= min <= max for lengths ({min_length}, {max_length}) "
                             f"and repeats ({min_repeats}, {max_repeats})")
        self.num_bits, self.batch_size = num_bits, batch_size
        self.lengths, self.repeats = (min_length, max_length), (min_repeats, max_repeats)
        self.norm_max, self.seed, self.device = norm_max, seed, torch.device(device)
        self._gen = torch.Generator().manual_seed(seed)
        self.batches = 0  # batches drawn so far

    @property
    def input_size(self) -> int:
        return self.num_bits + 2

    @property
    def target_size(self) -> int:
        return self.num_bits + 1

    def __iter__(self) -> RepeatCopy:
        return self

    def __next__(self) -> CopyBatch:
        B, n = self.batch_size, self.num_bits
        # Always the same three draws, so the stream depends on the seed and count only.
        L = torch.randint(self.lengths[0], self.lengths[1] + 1, (B,), generator=self._gen)
        R = torch.randint(self.repeats[0], self.repeats[1] + 1, (B,), generator=self._gen)
        pattern = torch.randint(0, 2, (B, self.lengths[1], n), generator=self._gen).float()
        self.batches += 1
        T = int((L * (R + 1) + 3).max())
        t = torch.arange(T)[:, None]  # [T, 1] against [B] per-sequence values
        ar = torch.arange(B)[None, :].expand(T, B)

        obs = torch.zeros(T, B, n + 2)
        shown = (t >= 1) & (t <= L)  # [T, B]: the pattern is on the input
        obs[..., :n] = pattern[ar, (t - 1).clamp(0, self.lengths[1] - 1)] * shown[..., None]
        obs[..., n] = (t == 0).float()
        obs[..., n + 1] = (t == L + 1) * (R / self.norm_max)

        k = t - (L + 2)  # position within the answer
        answer = (k >= 0) & (k < L * R)
        target = torch.zeros(T, B, n + 1)
        target[..., :n] = pattern[ar, k.clamp(min=0) % L] * answer[..., None]
        target[..., n] = (k == L * R).float()
        mask = ((k >= 0) & (k <= L * R)).float()
        return CopyBatch(obs.to(self.device), target.to(self.device), mask.to(self.device))

    def state_dict(self) -> dict[str, Any]:
        """The generator state and count: enough to continue the same stream."""
        return {"seed": self.seed, "batches": self.batches, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gen.set_state(state["generator"])
        self.seed, self.batches = state["seed"], state["batches"]


def repeat_copy_loss(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked sigmoid cross-entropy: summed over bits and steps, mean over the batch.

    Shapes: ``logits`` and ``target`` ``[T, B, C]``, ``mask`` ``[T, B]``; returns a 0-d tensor.
    """
    xent = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
    return (xent * mask).sum() / logits.shape[1]


@torch.no_grad()
def repeat_copy_accuracy(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Fraction of sequences whose every scored step is right (all bits, threshold 0)."""
    wrong = ((logits > 0).float() != target).any(-1).float() * mask  # [T, B]
    return (wrong.sum(0) == 0).float().mean()
