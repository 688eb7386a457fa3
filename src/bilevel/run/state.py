"""The state a recipe checkpoints: every object registered once, by name; saving and
restoring follow from what each object is.

A recipe names what must survive a restart once, after building it::

    state = RunState(model=model, opt=opt, sampler=sampler, h=h, best=best)
    start = run_dir.resume(state)                    # 0 for a fresh run
    for step in run_dir.steps(start, config.run.max_steps):
        ...
        run_dir.checkpoint(step, state)              # state_dict() only when a save is due

Each name is a key of the checkpoint's ``state``, and the entry's kind decides the rest:

=========================================  =====================  ===========================
entry                                      saved as               restored by
=========================================  =====================  ===========================
has ``state_dict``/``load_state_dict``     ``state_dict()``       ``load_state_dict(saved)``
(module, optimiser, sampler, scheduler,
a nested :class:`RunState`)
``torch.Generator``                        ``get_state()``        ``set_state(saved)``
tensor                                     detached reference     ``copy_`` in place
dict / list / tuple of the kinds above     the same structure     entry by entry
any other dict (numbers, strings, ...)     shallow copy           ``update(saved)``
:class:`Accessor`                          ``get()``              ``set(saved)``
``None`` (an optional object not built)    left out               its key must be absent
=========================================  =====================  ===========================

Tensors are restored in place (under ``no_grad``), so every reference to them elsewhere (an
optimiser's parameter list, a closure, a dict passed on) sees the restored values. As with
``nn.Module.state_dict``, saved tensors are detached *references* to the live ones: serialise
them (what :meth:`RunDir.checkpoint` does at once) or clone them before the run moves on.
A bare number cannot be restored in place: keep it in a dict, or register an
:class:`Accessor`, which is also the way for state the recipe rebinds rather than mutates
(``w = new_w`` every step) or must rebuild.

Loading is strict: a saved key no entry claims, or an entry the checkpoint lacks (a
checkpoint of another config, or of an older recipe), raises :class:`CheckpointError` naming
it before anything is restored; so does a nested key or a tensor shape or dtype that
differs. Entries are restored in the order they were registered.

Example:
    >>> import torch
    >>> w, counts = torch.zeros(2), {"skipped": 0}
    >>> state = RunState(w=w, counts=counts)
    >>> saved = {k: v.clone() if isinstance(v, torch.Tensor) else dict(v)
    ...          for k, v in state.state_dict().items()}
    >>> w += 1; counts["skipped"] = 3
    >>> state.load_state_dict(saved)
    >>> w.tolist(), counts
    ([0.0, 0.0], {'skipped': 0})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from bilevel.errors import CheckpointError

__all__ = ["Accessor", "RunState"]


@dataclass(frozen=True)
class Accessor:
    """An entry saved as ``get()`` and restored by ``set(saved)``: for state a recipe rebinds
    (a dict of weights replaced every step, a step counter) or must rebuild on load."""

    get: Callable[[], Any]
    set: Callable[[Any], None]

    @classmethod
    def items(cls, mapping: MutableMapping[str, Any]) -> dict[str, Accessor]:
        """One entry per key of ``mapping``, read and restored item by item: the counters of
        a dict saved as top-level keys, ``RunState(..., **Accessor.items(counts))``."""

        def entry(key: str) -> Accessor:
            return cls(get=lambda: mapping[key], set=lambda v: mapping.__setitem__(key, v))

        return {key: entry(key) for key in mapping}


class RunState:
    """Named objects saved and restored together (see the module docstring for the kinds).

    Args:
        **entries: name -> object; ``None`` marks an optional object this run does not have.

    Raises:
        TypeError: naming an entry of a kind that cannot be restored (a number, a string).
    """

    def __init__(self, **entries: Any) -> None:
        for name, value in entries.items():
            if value is not None:
                _check_kind(value, name)
        self._entries = entries

    @property
    def names(self) -> list[str]:
        """The checkpoint keys, in registration order (``None`` entries left out)."""
        return [k for k, v in self._entries.items() if v is not None]

    def __repr__(self) -> str:
        return f"RunState({', '.join(self.names)})"

    def state_dict(self) -> dict[str, Any]:
        """Every entry's saved form, by name (tensors are detached references)."""
        return {k: _save(v, k) for k, v in self._entries.items() if v is not None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every entry from ``state`` (a :meth:`state_dict`, possibly loaded from disk).

        Raises:
            CheckpointError: a key missing from ``state`` or not registered here, a nested
                key that differs, a tensor of another shape or dtype.
        """
        self._load(state, "")

    def _load(self, state: Any, path: str) -> None:
        _same_keys(self.names, state, path)
        prefix = f"{path}." if path else ""
        for name in self.names:
            _load(self._entries[name], state[name], prefix + name)


# -- the kinds ------------------------------------------------------------------------------


def _stateful(x: Any) -> bool:
    return callable(getattr(x, "state_dict", None)) and callable(getattr(x, "load_state_dict", None))


def _live(x: Any) -> bool:
    """Restored through itself (not by replacing a value in its container)."""
    if isinstance(x, (torch.Tensor, torch.Generator, Accessor)) or _stateful(x):
        return True
    if isinstance(x, Mapping):
        return bool(x) and all(_live(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_live(v) for v in x)
    return False


def _check_kind(x: Any, path: str) -> None:
    if _live(x):
        return
    if isinstance(x, MutableMapping):  # plain values, restored with update
        bad = [k for k, v in x.items() if isinstance(v, (torch.Generator, Accessor)) or _stateful(v)]
        if bad:
            raise TypeError(f"state entry {path!r} mixes objects ({path}.{bad[0]}) with plain "
                            "values; register them as separate entries")
        return
    raise TypeError(f"state entry {path!r} ({type(x).__name__}) cannot be restored in place: "
                    "keep it in a dict, or register an Accessor(get=..., set=...)")


def _save(x: Any, path: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, torch.Generator):
        return x.get_state()
    if isinstance(x, Accessor):
        return x.get()
    if _stateful(x):
        return x.state_dict()
    if isinstance(x, Mapping):
        if _live(x):
            return {k: _save(v, f"{path}.{k}") for k, v in x.items()}
        _check_kind(x, path)  # its values may have changed since registration
        return dict(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_save(v, f"{path}[{i}]") for i, v in enumerate(x))
    raise TypeError(f"state entry {path!r} became a {type(x).__name__}, which cannot be saved")


def _load(x: Any, saved: Any, path: str) -> None:
    if isinstance(x, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise CheckpointError(f"checkpoint state {path!r}: expected a tensor, found a "
                                  f"{type(saved).__name__}")
        if saved.shape != x.shape or saved.dtype != x.dtype:
            raise CheckpointError(f"checkpoint state {path!r}: saved {saved.dtype} of shape "
                                  f"{list(saved.shape)}, this run has {x.dtype} of shape "
                                  f"{list(x.shape)} (a checkpoint of another config?)")
        with torch.no_grad():
            x.copy_(saved)
    elif isinstance(x, torch.Generator):
        x.set_state(saved)
    elif isinstance(x, Accessor):
        x.set(saved)
    elif isinstance(x, RunState):
        x._load(saved, path)  # nested: errors name the whole path
    elif _stateful(x):
        x.load_state_dict(saved)
    elif isinstance(x, Mapping):
        _same_keys(list(x), saved, path)
        if _live(x):
            for k, v in x.items():
                _load(v, saved[k], f"{path}.{k}")
        elif isinstance(x, MutableMapping):  # plain values (what _check_kind admits)
            x.update(saved)
    else:  # list / tuple of live entries
        if not isinstance(saved, (list, tuple)) or len(saved) != len(x):
            raise CheckpointError(f"checkpoint state {path!r}: expected a sequence of {len(x)}, "
                                  f"found {_describe(saved)}")
        for i, (v, s) in enumerate(zip(x, saved, strict=True)):
            _load(v, s, f"{path}[{i}]")


def _same_keys(expected: list[Any], saved: Any, path: str) -> None:
    where = f"checkpoint state {path!r}" if path else "checkpoint state"
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{where}: expected a mapping, found {_describe(saved)}")
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    if missing or extra:
        prefix = f"{path}." if path else ""
        parts = ([f"lacks {', '.join(repr(prefix + str(k)) for k in missing)}"] if missing else []) \
            + ([f"has unregistered {', '.join(repr(prefix + str(k)) for k in extra)}"]
               if extra else [])
        raise CheckpointError(f"{where} {' and '.join(parts)}: it was written by another config "
                              "or version of the recipe; start a new run (or resume with the "
                              "code that wrote it)")


def _describe(x: Any) -> str:
    return f"a {type(x).__name__}" + (f" of {len(x)}" if isinstance(x, (list, tuple)) else "")
