"""Image splits as ``[n, C, H, W]`` tensors, resized, scaled and subsampled as a recipe asks.

The one image loader of the recipes (GTN, both Commentaries algorithms, their evaluation
commands). The papers scale their inputs differently, so the scaling is an argument:

* ``"dataset"``: the data set's own constants, ``(x - info["mean"]) / info["std"]`` (the
  publisher's statistics, as :func:`load_dataset` applies them); a set without constants
  (``digits``) falls back to ``"symmetric"``;
* ``"standard"``: the same constants when the set has them, else the statistics of the first
  split asked for (``train``), computed after resizing;
* ``"symmetric"``: ``2x - 1``, pixels in ``[-1, 1]``.

``digits`` (flat ``[n, 64]`` rows in ``[0, 1]``) is reshaped to ``[n, 1, 8, 8]`` first, so
the tests and offline runs use the recipes' image code path.

``sizes`` keeps a random subset of a split: one generator seeded with ``split_seed + 1``
draws the subsets in the order of ``splits``, so a subset does not depend on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.data._api import load_dataset

Scale = Literal["dataset", "standard", "symmetric"]
Splits = dict[str, tuple[Tensor, Tensor]]


def image_splits(
    name: str,
    *,
    data_dir: str | None = None,
    split_seed: int = 0,
    splits: Sequence[str] = ("train", "val", "test"),
    side: int | None = None,
    scale: Scale = "dataset",
    sizes: Mapping[str, int | None] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Splits, dict[str, Any]]:
    """``({split: (x, y)}, info)`` for ``splits`` of data set ``name``.

    Args:
        name: a registered image data set (``bilevel data list``) or ``digits``.
        data_dir: data directory (default ``$BILEVEL_DATA``).
        split_seed: seed of the train/validation hold-out and (+1) of the subsets.
        splits: which of ``train``, ``val``, ``test`` to return, in this order.
        side: resize to ``side x side`` (bilinear) when the images differ.
        scale: ``"dataset"``, ``"standard"`` or ``"symmetric"`` (module docstring).
        sizes: ``{split: n}`` keeps ``n`` random images of that split (``None``: all).
        device: where the tensors go.
    """
    constants = scale != "symmetric"
    ds = load_dataset(name, data_dir, split_seed=split_seed,
                      normalize=scale == "dataset" and name != "digits")
    flat = len(ds.info["input_shape"]) == 1
    mean = float(ds.info["mean"][0]) if constants and "mean" in ds.info else None
    std = float(ds.info["std"][0]) if constants and "std" in ds.info else None
    gen = torch.Generator().manual_seed(split_seed + 1)
    out: Splits = {}
    for split in splits:
        part = getattr(ds, split)
        x, y = part.x.float(), part.y
        if flat:
            s = int(x.shape[-1] ** 0.5)
            x = x.view(-1, 1, s, s)
        if side is not None and x.shape[-1] != side:
            # why align_corners=False: torch's default, and what both papers' resizes did
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        if scale == "standard":
            if mean is None or std is None:
                mean, std = float(x.mean()), float(x.std())  # the first split: train
            x = (x - mean) / std
        elif scale == "symmetric" or not ds.info.get("normalized", False):
            x = 2 * x - 1
        n = (sizes or {}).get(split)
        if n is not None and n < len(y):
            keep = torch.randperm(len(y), generator=gen)[:n]
            x, y = x[keep], y[keep]
        out[split] = (x.contiguous().to(device), y.to(device))
    return out, ds.info
