"""``DifferentiableOptimizer``: a ``torch.optim`` optimiser's update as a differentiable map.

``step(loss)`` takes the gradient of ``loss`` with respect to the current fast weights
(with ``create_graph=True`` while tracking), applies the optimiser's update out of place and
hands the new fast weights to the patched module. Conventions, as in ``higher``:

* Hyperparameters and state are copied from the ``torch.optim`` instance when the
  differentiable optimiser is built (so a half-trained optimiser continues where it was);
  the original optimiser is never changed.
* ``override={"lr": [t]}`` (one value for every group) or ``{"lr": [t0, t1, ...]}`` (one per
  group) replaces settings, usually by tensors that require grad; ``step(loss,
  override=...)`` replaces them from then on.
* Parameters without a gradient (unused, or frozen with ``requires_grad=False``) are left
  unchanged and their state is not created, as ``torch.optim`` does.
* ``track_higher_grads=False``: gradients are taken without a graph and the new fast
  weights and every state tensor are detached, so nothing of earlier steps stays alive.

Subclasses implement ``_rule(p, g, state, group) -> new_p`` for one parameter (``g`` already
negated when ``maximize``), or override ``_update(grouped_grads)`` as ``higher``'s did.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.compat.higher._module import FunctionalModule
from bilevel.compat.higher.utils import (
    _find_param_in_list,
    _recursive_copy_and_cast,
    _recursive_map,
)

OverrideType = dict[str, list[Any]]
GradCallbackType = Callable[[Sequence[Tensor | None]], Sequence[Tensor | None]]


class DifferentiableOptimizer(abc.ABC):  # noqa: B024 (subclasses override _rule or _update)
    """Base class of the differentiable optimisers (see the module docstring)."""

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: FunctionalModule | None = None,
        device: torch.device | None = None,
        override: OverrideType | None = None,
        grad_callback: GradCallbackType | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        reference = list(reference_params)
        self.param_groups: list[dict[str, Any]] = []
        self.state: list[collections.defaultdict[int, dict[str, Any]]] = []
        self._group_to_param_list: list[list[int]] = []
        for gi, group in enumerate(other.param_groups):
            settings = {k: _recursive_map(v, lambda x: x) for k, v in group.items()}
            settings["params"] = [None] * len(group["params"])
            self.param_groups.append(settings)
            self.state.append(collections.defaultdict(dict))
            indices = []
            for pi, p in enumerate(group["params"]):
                index = _find_param_in_list(p, reference)
                if index is None:
                    raise ValueError(
                        f"parameter {pi} of group {gi} of the optimiser is not among the "
                        f"reference parameters. Build the optimiser over model.parameters() "
                        f"of the model you patch (or pass that model's parameters)."
                    )
                indices.append(index)
                if other.state.get(p):
                    copied = _recursive_copy_and_cast(dict(other.state[p]), device)
                    self.state[gi][pi] = self._import_state(copied)
            self._group_to_param_list.append(indices)
        if override is not None:
            self._apply_override(override)
        self._grad_callback = grad_callback
        self._fmodel = fmodel
        self._track_higher_grads = track_higher_grads

    def _import_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Convert one parameter's ``torch.optim`` state to this rule's (step as an int)."""
        if isinstance(state.get("step"), Tensor):
            state["step"] = int(state["step"].item())
        return state

    def _apply_override(self, override: OverrideType) -> None:
        for key, values in override.items():
            if not isinstance(values, (list, tuple)) or len(values) not in (
                1,
                len(self.param_groups),
            ):
                raise ValueError(
                    f"override[{key!r}] must be a list of one value (shared by every group) "
                    f"or of {len(self.param_groups)} values (one per parameter group), got "
                    f"{values!r}."
                )
            if any(key not in g for g in self.param_groups):
                known = sorted(k for k in self.param_groups[0] if k != "params")
                raise ValueError(
                    f"override key {key!r} is not a setting of {type(self).__name__}'s "
                    f"parameter groups; known settings: {known}."
                )
            for gi, group in enumerate(self.param_groups):
                group[key] = values[0] if len(values) == 1 else values[gi]

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: OverrideType | None = None,
        grad_callback: GradCallbackType | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One differentiable update from ``loss``; returns (and installs) the new fast weights.

        Args:
            loss: the inner loss, a function of the current fast weights.
            params: the fast weights to update (default: the patched module's latest).
            override: settings to replace from now on (see the module docstring).
            grad_callback: maps the list of gradients (``None`` for unused parameters)
                before the update, e.g. to clip them; replaces the constructor's.
        """
        if override is not None:
            self._apply_override(override)
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "params kwarg must be passed to step if the differentiable optimizer "
                    "doesn't have a view on a patched model with params."
                )
            params = self._fmodel.fast_params
        params = list(params)
        wanted = [i for i, p in enumerate(params) if p.requires_grad]
        found = torch.autograd.grad(
            loss,
            [params[i] for i in wanted],
            create_graph=self._track_higher_grads,
            allow_unused=True,
        )
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(wanted, found, strict=True):
            grads[i] = g
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = list(callback(grads))

        grouped = []
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            group["params"] = [params[i] for i in indices]
            grouped.append([grads[i] for i in indices])
        self._update(grouped)

        new_params = list(params)
        for group, indices in zip(self.param_groups, self._group_to_param_list, strict=True):
            for p, i in zip(group["params"], indices, strict=True):
                new_params[i] = p if self._track_higher_grads else p.detach().requires_grad_()
            group["params"] = [None] * len(indices)  # hold no fast weights between steps
        if not self._track_higher_grads:
            self._detach_state()
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Write each group's updated parameters into ``group["params"]``."""
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            maximize = group.get("maximize", False)
            for pi, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:
                    continue
                group["params"][pi] = self._rule(
                    p, -g if maximize else g, self.state[gi][pi], group
                )

    def _rule(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} must implement _rule(p, g, state, group) or _update."
        )

    def _detach_state(self) -> None:
        for group_state in self.state:
            for entry in group_state.values():
                for key, value in entry.items():
                    entry[key] = _recursive_map(
                        value, lambda x: x.detach() if isinstance(x, Tensor) else x
                    )
