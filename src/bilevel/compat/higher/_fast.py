"""The state behind a patched module: fast-weight history, buffer copies, train/eval flags.

A patched module never changes the user's module. Each call runs it through
``torch.func.functional_call`` with the latest fast weights and the patched module's own
buffer copies:

* **Fast weights** are one list in ``module.parameters()`` order (tied parameters appear
  once). With ``track_higher_grads=True`` every update appends a list, so
  ``parameters(time=t)`` can reach the weights of step ``t``; otherwise only the latest list
  is kept, so memory does not grow with the number of steps.
* **Buffers** follow bilevel's policy (:mod:`bilevel.functional`): copied from the module when
  patched, advanced by train-mode calls (BatchNorm running statistics), never
  differentiated, never written back: ``module.load_state_dict(fmodel.state_dict())`` does.
* **Train/eval flags** are the patched module's own, taken from the module when patched and
  set on the module only for the duration of a call.

Nothing here refers back to the wrappers users hold, so dropping a patched module frees its
fast weights at once (no reference cycle waits for the garbage collector).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

_ROOT = "m"  # the user's module is the shim's only child, so every name gains this prefix


class _Shim(nn.Module):
    """Calls a submodule or a method of the wrapped module inside ``functional_call``.

    ``functional_call`` can only run a module's ``forward``; routing through this shim lets
    the same machinery run ``fmodel.encoder(x)`` or ``fmodel.custom_method(x)`` with fast
    weights. Registering the user's module as a child does not modify it.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(
        self, path: str, method: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        target = self.m.get_submodule(path) if path else self.m
        fn = target if method is None else getattr(target, method)
        return fn(*args, **kwargs)


class FastState:
    """Fast weights, buffers and flags of one patched module (shared by its views)."""

    def __init__(
        self,
        module: nn.Module,
        params: list[Tensor] | None,
        *,
        track_higher_grads: bool,
        device: torch.device | None = None,
    ) -> None:
        self.module = module
        self.shim = _Shim(module)
        self.slots, self.call_slots, self.n_params = _slots(
            module, module.named_parameters(remove_duplicate=False)
        )
        self.index_of = dict(self.slots)
        buffer_slots, self.buffer_call_slots, _ = _slots(
            module, module.named_buffers(remove_duplicate=False)
        )
        # buffers are stored under the first name of each distinct tensor
        first: dict[int, str] = {}
        for name, index in buffer_slots:
            first.setdefault(index, name)
        self.buffer_alias = {name: first[index] for name, index in buffer_slots}
        self.buffer_call_slots = [(n, first[i]) for n, i in self.buffer_call_slots]
        self.buffers: dict[str, Tensor] = {}
        self.sync_buffers(module, device)
        self.modules = list(module.named_modules(remove_duplicate=False))
        self.flags = {path: m.training for path, m in self.modules}
        self.track = track_higher_grads
        self.history: list[list[Tensor]] = []
        self.released = False  # set when a context exit dropped the intermediate steps
        if params is not None:
            self.push(params)

    # -- fast weights -----------------------------------------------------------------
    def push(self, params: Any) -> None:
        """Make ``params`` (one tensor per unique parameter) the latest fast weights."""
        params = list(params)
        if len(params) != self.n_params:
            raise ValueError(
                f"expected {self.n_params} fast weights (one per tensor of "
                f"module.parameters(), tied ones once), got {len(params)}. Pass the list "
                f"fmodel.parameters() or diffopt.step(...) returns."
            )
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"fast weight {i} must be a Tensor, got {type(p).__name__}.")
        if self.track:
            self.history.append(params)
        else:
            self.history = [params]

    @property
    def latest(self) -> list[Tensor] | None:
        return self.history[-1] if self.history else None

    def at(self, time: int | None) -> list[Tensor]:
        """The fast weights after ``time`` updates (``None`` or -1: the latest)."""
        if not self.history:
            raise ValueError(
                "this patched module holds no fast weights: pass params=... when calling it, "
                "or create it with monkeypatch(module) instead of make_functional."
            )
        time = -1 if time is None else time
        if not self.track:
            if time not in (-1, 0):
                raise ValueError(
                    "The patched model is not tracking higher gradients "
                    "(track_higher_grads=False): only the latest parameters are available; "
                    "use time=None."
                )
            return self.history[-1]
        if self.released and time not in (0, -1):
            raise ValueError(
                f"fast weights at time={time} were released when innerloop_ctx exited; only "
                f"time=0 and the latest (time=None) are kept. Read them inside the context."
            )
        try:
            return self.history[time]
        except IndexError:
            raise ValueError(
                f"time={time} is out of range: {len(self.history) - 1} updates so far."
            ) from None

    def release(self) -> None:
        """Keep only the first and latest fast weights (called when a context exits)."""
        if self.track and len(self.history) > 2:
            self.history = [self.history[0], self.history[-1]]
        self.released = True

    # -- buffers ----------------------------------------------------------------------
    def sync_buffers(self, module: nn.Module, device: torch.device | None = None) -> None:
        """Copy ``module``'s buffers into this state (detached clones)."""
        stored = set(self.buffer_alias.values())
        self.buffers = {
            name: b.detach().clone() if device is None else b.detach().clone().to(device)
            for name, b in module.named_buffers(remove_duplicate=False)
            if name in stored
        }

    def buffer(self, name: str) -> Tensor | None:
        """The current copy of the buffer called ``name`` (any of its names)."""
        stored = self.buffer_alias.get(name)
        return None if stored is None else self.buffers.get(stored)

    # -- calling ----------------------------------------------------------------------
    def call(self, path: str, method: str | None, args: tuple, kwargs: dict) -> Any:
        """Run ``module.<path>`` (or its ``method``) with the latest fast weights."""
        latest = self.latest
        if latest is None:
            raise ValueError(
                "params keyword must be provided if the patched module does not track its own "
                "fast weights (it was made with make_functional): call fmodel(x, params=...)."
            )
        tensors = {f"{_ROOT}.{name}": latest[i] for name, i in self.call_slots}
        # bilevel's buffer policy (bilevel.functional): run on detached clones, keep them
        clones = {name: b.detach().clone() for name, b in self.buffers.items()}
        for name, stored in self.buffer_call_slots:
            tensors[f"{_ROOT}.{name}"] = clones[stored]
        changed = self._set_modes()
        try:
            # one name per (module, attribute): torch 2.13's functional_call restores a slot
            # reached under two names (a shared submodule) in the wrong order and leaves the
            # module holding the fast weight; tie_weights=False stops it re-adding aliases.
            out = functional_call(
                self.shim, tensors, (path, method, args, kwargs), tie_weights=False, strict=False
            )
        finally:
            for m, mode in reversed(changed):  # reversed: a shared submodule appears twice
                m.training = mode
        # functional_call writes back a buffer the module reassigned instead of updating
        for name, stored in self.buffer_call_slots:
            clones[stored] = tensors[f"{_ROOT}.{name}"].detach()
        self.buffers = clones
        return out

    def _set_modes(self) -> list[tuple[nn.Module, bool]]:
        """Give the module this state's train/eval flags; return what to restore."""
        changed = []
        for path, m in self.modules:
            mode = self.flags[path]
            if m.training != mode:
                changed.append((m, m.training))
                m.training = mode
        return changed


def _slots(
    module: nn.Module, named: Iterator[tuple[str, Tensor]]
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """Index every tensor name by its distinct tensor, in ``module``'s order.

    Returns ``(all_slots, call_slots, n_distinct)``: ``all_slots`` has every name (a tied
    or shared tensor under each of its names), ``call_slots`` one name per (owning module,
    attribute) pair, which is what ``functional_call`` must be given.
    """
    distinct: dict[int, int] = {}
    owners: set[tuple[int, str]] = set()
    all_slots, call_slots = [], []
    for name, t in named:
        index = distinct.setdefault(id(t), len(distinct))
        all_slots.append((name, index))
        owner, _, attr = name.rpartition(".")
        key = (id(module.get_submodule(owner)), attr)
        if key not in owners:
            owners.add(key)
            call_slots.append((name, index))
    return all_slots, call_slots, len(distinct)
