"""In-memory data sets: three tensor splits plus a description, and how splits are drawn.

Conventions:
    * Inputs are float32. Class labels are int64 of shape ``[n]``; regression targets are
      float32 of shape ``[n, 1]``; language-model tokens are int64 streams (``x[i]`` predicts
      ``y[i] = x[i + 1]``).
    * Images are ``[n, C, H, W]`` with pixel values in ``[0, 1]``; the seed's per-channel mean
      and std are in ``info["mean"]``/``info["std"]`` and applied only if ``normalize=True``.
    * ``split_seed=int`` draws the validation rows like ``torch.utils.data.random_split``
      (``randperm`` from a ``torch.Generator`` seeded with ``split_seed``: the first
      ``n - val_size`` indices train, the rest validate). ``split_seed=None`` takes the last
      ``val_size`` rows of the training file (the fixed split of Clarke et al. and ALI-G).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` and targets ``y`` with the same first dimension."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """The same split on ``device`` (keep small data sets on the accelerator)."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits plus ``info`` (name, task, shapes, units)."""

    train: Split
    val: Split
    test: Split
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Dataset:
        """All three splits on ``device``."""
        return Dataset(self.train.to(device), self.val.to(device), self.test.to(device), self.info)

    def sizes(self) -> tuple[int, int, int]:
        """``(len(train), len(val), len(test))``."""
        return len(self.train), len(self.val), len(self.test)


def holdout(n: int, val_size: int, split_seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` that hold out ``val_size`` of ``n`` rows.

    Args:
        n: number of rows in the training file.
        val_size: rows to hold out, ``0 <= val_size < n``.
        split_seed: ``None`` for the last ``val_size`` rows, else the seed of a
            ``torch.Generator`` permutation (identical to ``random_split`` with that generator).
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for {n} training rows, got {val_size}")
    if split_seed is None:
        order = np.arange(n)
    else:
        gen = torch.Generator().manual_seed(int(split_seed))
        order = torch.randperm(n, generator=gen).numpy()
    return order[: n - val_size], order[n - val_size :]


def images_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[n, C, H, W]`` pixels to float32 in ``[0, 1]``."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"expected uint8 [n, C, H, W] pixels, got {pixels.dtype} {pixels.shape}")
    return torch.from_numpy(pixels).float().div_(255.0)


def normalize_images(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``[n, C, H, W]`` images."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def image_dataset(
    arrays: dict[str, np.ndarray],
    info: dict[str, Any],
    *,
    val_size: int,
    split_seed: int | None,
    normalize: bool,
) -> Dataset:
    """Build a classification :class:`Dataset` from cached ``x_train/y_train/x_test/y_test``."""
    x_all, y_all = images_to_tensor(arrays["x_train"]), torch.from_numpy(arrays["y_train"]).long()
    x_test, y_test = images_to_tensor(arrays["x_test"]), torch.from_numpy(arrays["y_test"]).long()
    if normalize:
        x_all = normalize_images(x_all, info["mean"], info["std"])
        x_test = normalize_images(x_test, info["mean"], info["std"])
    tr, va = (torch.from_numpy(i) for i in holdout(len(y_all), val_size, split_seed))
    info = {**info, "input_shape": tuple(x_all.shape[1:]), "normalized": normalize}
    info["split"] = _split_note(val_size, split_seed)
    return Dataset(Split(x_all[tr], y_all[tr]), Split(x_all[va], y_all[va]), Split(x_test, y_test), info)


def _split_note(val_size: int, split_seed: int | None) -> str:
    if split_seed is None:
        return f"last {val_size} training rows validate (fixed)"
    return f"{val_size} training rows validate, drawn by randperm with seed {split_seed}"
