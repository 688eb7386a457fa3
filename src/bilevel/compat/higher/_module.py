"""``FunctionalModule``: the patched module ``monkeypatch`` returns, and views of its parts.

It behaves like the module it wraps, but every call runs on fast weights (see
:mod:`bilevel.compat.higher._fast`): ``fmodel(x)``, ``fmodel(x, params=[...])``,
``fmodel.encoder(x)`` (a submodule view), ``fmodel.embed(x)`` (a method of the module),
``fmodel.parameters(time=t)``, ``fmodel.state_dict()``. Unlike ``higher`` it creates no
subclass of the module's class and never assigns to the module's attributes outside a call.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from bilevel.compat.higher._fast import FastState


class FunctionalModule(nn.Module):
    """A stateless version of a module (or of one of its submodules) over fast weights.

    Attribute access falls through to the wrapped module: submodules come back as views
    sharing the same fast weights, parameters and buffers as their current fast values,
    methods as functions that run with the fast weights, anything else unchanged.
    """

    def __init__(self, state: FastState, path: str = "") -> None:
        super().__init__()
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_prefix", f"{path}." if path else "")
        object.__setattr__(self, "training", state.flags.get(path, True))

    # -- calling ----------------------------------------------------------------------
    def forward(self, *args: Any, params: Iterable[Tensor] | None = None, **kwargs: Any) -> Any:
        """Run the module; ``params`` (the full list of fast weights) replaces the latest."""
        if params is not None:
            self._state.push(params)
        return self._state.call(self._path, None, args, kwargs)

    # -- fast weights -----------------------------------------------------------------
    def _mine(self, remove_duplicate: bool = True) -> list[tuple[str, int]]:
        """(name relative to this view, fast-weight index) for the parameters under it."""
        out, seen = [], set()
        for name, index in self._state.slots:
            if not name.startswith(self._prefix):
                continue
            if remove_duplicate and index in seen:
                continue
            seen.add(index)
            out.append((name[len(self._prefix) :], index))
        return out

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights after ``time`` updates (default: the latest), tied ones once."""
        values = self._state.at(time)
        return iter([values[i] for _, i in self._mine()])

    def named_parameters(
        self,
        prefix: str = "",
        recurse: bool = True,
        remove_duplicate: bool = True,
        time: int | None = None,
    ) -> Iterator[tuple[str, Tensor]]:
        values = self._state.at(time)
        sep = f"{prefix}." if prefix else ""
        return iter([(sep + n, values[i]) for n, i in self._mine(remove_duplicate)])

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights of the whole patched module (``None`` if it has none)."""
        return self._state.latest

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        self._state.push(value)

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Make ``params`` the latest fast weights (what a differentiable optimiser calls)."""
        self._state.push(params)

    @property
    def init_fast_params(self) -> list[Tensor]:
        if not self._state.track:
            raise RuntimeError(
                "Cannot get initial parameters when not tracking higher gradients "
                "(track_higher_grads=False)."
            )
        return self._state.at(0)

    @property
    def track_higher_grads(self) -> bool:
        return self._state.track

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads must be a bool, got {type(value).__name__}.")
        self._state.track = value

    # -- buffers, modes, state dicts ----------------------------------------------------
    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        sep, n, out, seen = f"{prefix}." if prefix else "", len(self._prefix), [], set()
        for name, stored in self._state.buffer_alias.items():
            if name.startswith(self._prefix) and not (remove_duplicate and stored in seen):
                seen.add(stored)
                out.append((sep + name[n:], self._state.buffers[stored]))
        return iter(out)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        return iter([b for _, b in self.named_buffers()])

    def train(self, mode: bool = True) -> FunctionalModule:
        """Set train/eval mode of this patched (sub)module; the wrapped module is untouched."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be a bool, got {type(mode).__name__}")
        for path in self._state.flags:
            if path == self._path or path.startswith(self._prefix):
                self._state.flags[path] = mode
        object.__setattr__(self, "training", mode)
        return self

    def named_children(self) -> Iterator[tuple[str, FunctionalModule]]:
        """Views of the direct submodules (they share these fast weights)."""
        children = self._target()._modules.items()
        return iter(
            [
                (n, FunctionalModule(self._state, self._prefix + n))
                for n, m in children
                if m is not None
            ]
        )

    def children(self) -> Iterator[FunctionalModule]:
        return iter([m for _, m in self.named_children()])

    def named_modules(
        self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, FunctionalModule]]:
        """This view and views of every submodule below it (patched views, not the modules:
        ``isinstance(view, nn.BatchNorm2d)`` is false; test ``view.wrapped_module()`` instead).
        """
        out, seen = [], set()
        for path, m in self._target().named_modules(remove_duplicate=False):
            if remove_duplicate and id(m) in seen:
                continue
            seen.add(id(m))
            full = self._prefix + path if path else self._path
            name = ".".join(x for x in (prefix, path) if x)
            out.append((name, self if not path else FunctionalModule(self._state, full)))
        return iter(out)

    def modules(self) -> Iterator[FunctionalModule]:
        return iter([m for _, m in self.named_modules()])

    def wrapped_module(self) -> nn.Module:
        """The (unchanged) module this view runs, e.g. for ``isinstance`` checks."""
        return self._target()

    def _target(self) -> nn.Module:
        m = self._state.module
        return m.get_submodule(self._path) if self._path else m

    def state_dict(
        self, *, destination: dict | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The wrapped module's state dict with the latest fast weights and buffer copies.

        Load it into the original module to keep what the inner loop learned:
        ``model.load_state_dict(fmodel.state_dict())``.
        """
        latest = self._state.latest
        out = OrderedDict() if destination is None else destination
        for name, value in self._target().state_dict(keep_vars=True).items():
            full = self._prefix + name
            if latest is not None and full in self._state.index_of:
                value = latest[self._state.index_of[full]]
            elif full in self._state.buffer_alias:
                value = self._state.buffer(full)
            if isinstance(value, Tensor) and not keep_vars:
                value = value.detach()
            out[prefix + name] = value
        return out

    def load_state_dict(
        self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Set fast weights (as a new time step) and buffers from a state dict."""
        state, latest = self._state, self._state.latest
        if latest is None:
            raise ValueError("this patched module holds no fast weights to load into.")
        new = list(latest)
        known = {self._prefix + n for n in self._target().state_dict(keep_vars=True)}
        unexpected = [k for k in state_dict if self._prefix + k not in known]
        missing = [
            k[len(self._prefix) :] for k in known if k[len(self._prefix) :] not in state_dict
        ]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"load_state_dict: missing keys {sorted(missing)}, unexpected keys "
                f"{sorted(unexpected)}. Pass a state dict of the same module, or strict=False."
            )
        with torch.no_grad():
            for name, value in state_dict.items():
                full = self._prefix + name
                if full in state.index_of:
                    old = new[state.index_of[full]]
                    v = value.detach().clone().to(device=old.device, dtype=old.dtype)
                    new[state.index_of[full]] = v.requires_grad_(old.requires_grad)
                elif full in state.buffer_alias:
                    state.buffers[state.buffer_alias[full]] = value.detach().clone()
        state.push(new)
        return _IncompatibleKeys(missing, unexpected)

    # -- attribute access falls through to the wrapped module ---------------------------
    def __getattr__(self, name: str) -> Any:
        state = self.__dict__.get("_state")
        if state is None:
            return super().__getattr__(name)
        target, full = self._target(), self._prefix + name
        if target._parameters.get(name) is not None:
            return state.at(None)[state.index_of[full]]
        if target._buffers.get(name) is not None:
            return state.buffer(full)
        if name in target._modules:
            return None if target._modules[name] is None else FunctionalModule(state, full)
        attr = getattr(target, name)
        if inspect.ismethod(attr) and attr.__self__ is target:
            path = self._path

            def with_fast_weights(*args: Any, **kwargs: Any) -> Any:
                return state.call(path, name, args, kwargs)

            return with_fast_weights
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        state = self.__dict__.get("_state")
        if state is not None and name != "training":
            target, full = self._target(), self._prefix + name
            if target._parameters.get(name) is not None:
                if not isinstance(value, Tensor):
                    raise TypeError(f"fast weight {full!r} must be a Tensor, got {type(value)}")
                new = list(state.at(None))
                new[state.index_of[full]] = value
                state.push(new)
                return
            if target._buffers.get(name) is not None:
                state.buffers[state.buffer_alias[full]] = value
                return
        super().__setattr__(name, value)

    def __getitem__(self, idx: int | str) -> FunctionalModule:
        """A view of a child of a container (``fmodel.features[0]``)."""
        target = self._target()
        if isinstance(target, (nn.Sequential, nn.ModuleList)) and isinstance(idx, int):
            key = list(target._modules)[idx]
        elif isinstance(target, nn.ModuleDict) and isinstance(idx, str):
            key = idx
        else:
            raise TypeError(
                f"{type(target).__name__} views support fmodel[int] (Sequential, ModuleList) "
                f"or fmodel[str] (ModuleDict), got {type(idx).__name__}."
            )
        return FunctionalModule(self._state, self._prefix + key)

    def __len__(self) -> int:
        return len(self._target())

    def __repr__(self) -> str:
        return f"FunctionalModule({self._target()!r})"
