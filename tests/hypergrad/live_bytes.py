"""Count the bytes of tensor storage alive while a function runs (CPU or GPU, no timing).

A ``TorchDispatchMode`` sees every tensor an op creates, including those autograd saves
for backward and those of the backward pass itself. Each new storage is counted once and
uncounted when its memory is freed (PyTorch keeps a storage's Python object alive exactly
as long as the storage, so a weak reference's callback fires at the free).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: f()`` then ``m.peak``: the most bytes alive at once among
    the storages created inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, tuple[weakref.ref, int]] = {}  # data_ptr -> (storage ref, bytes)

    def _count(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._refs or not key:
            return
        nbytes = st.nbytes()
        self._refs[key] = (weakref.ref(st, lambda _, key=key: self._free(key)), nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._refs.pop(key)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._count(out)
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self._count(t)
        return out
