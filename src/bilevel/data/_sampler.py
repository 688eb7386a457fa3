"""Mini-batches as index tensors, drawn from a checkpointable ``torch.Generator``.

For small data sets kept whole on the device, a batch is ``x[idx], y[idx]``: no DataLoader,
no worker processes. Each epoch is one ``randperm`` from the sampler's own generator, so the
global RNG is never touched and the order depends only on ``seed``.

Example:
    >>> sampler = IndexSampler(10, 4, seed=0)
    >>> first = next(sampler)
    >>> state = sampler.state_dict()
    >>> second = next(sampler)
    >>> resumed = IndexSampler(10, 4, seed=0)
    >>> resumed.load_state_dict(state)
    >>> bool(torch.equal(next(resumed), second))
    True
"""

from __future__ import annotations

from typing import Any

import torch


class IndexSampler:
    """An endless iterator of ``LongTensor`` index batches, epoch after epoch.

    Args:
        n: number of rows to sample from.
        batch_size: rows per batch.
        seed: seed of the sampler's private ``torch.Generator``.
        drop_last: drop the last incomplete batch of each epoch (so every batch has
            ``batch_size`` rows); otherwise the last batch of an epoch may be smaller.
        shuffle: draw a new permutation each epoch; ``False`` gives ``0..n-1`` in order.
        device: where the index tensors are placed.

    Attributes:
        epoch: epochs completed so far (the current epoch's number, from 0).
        steps_per_epoch: batches in one epoch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} exceeds n={n} with drop_last=True: no batch would be "
                "full; lower batch_size or pass drop_last=False"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.drop_last, self.shuffle, self.device = drop_last, shuffle, torch.device(device)
        self._gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._position = 0
        self._start_epoch()

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _start_epoch(self) -> None:
        # Remember the generator state *before* this epoch's permutation: that, the epoch
        # number and the position within the epoch are the whole checkpointable state.
        self._epoch_state = self._gen.get_state()
        perm = torch.randperm(self.n, generator=self._gen) if self.shuffle else torch.arange(self.n)
        self._perm = perm.to(self.device)

    def __iter__(self) -> IndexSampler:
        return self

    def __next__(self) -> torch.Tensor:
        if self._position >= self.steps_per_epoch:
            self.epoch += 1
            self._position = 0
            self._start_epoch()
        start = self._position * self.batch_size
        self._position += 1
        return self._perm[start : start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same order bit-for-bit."""
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self._position,
            "generator_state": self._epoch_state.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the sampler must have the same ``n`` and ``batch_size``."""
        for key in ("n", "batch_size", "drop_last", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; build the sampler with the saved settings"
                )
        self.seed = state["seed"]
        self._gen.set_state(state["generator_state"].clone())
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._start_epoch()
