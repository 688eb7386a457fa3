"""The ``torch.optim.Optimizer`` face of AliG: the maths of :mod:`bilevel.optim.alig`,
applied in place under ``no_grad``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import ConfigError
from bilevel.optim import alig


class AliG(torch.optim.Optimizer):
    r"""AliG: SGD whose step size is the clipped Polyak step
    :math:`\gamma = \min(\ell / (\sum\lVert g\rVert^2 + \epsilon), \text{max\_lr})`.

    The update is :func:`bilevel.optim.alig.update` with the step size of
    :func:`bilevel.optim.alig.unclipped_step_size` (one implementation, two faces); see
    :mod:`bilevel.optim.alig` for the formulas and the edge cases (zero loss, negative loss,
    zero gradient). One unclipped step size is shared by all parameter groups; only
    ``max_lr``, ``momentum`` and ``adjusted_momentum`` may differ per group.

    The arguments keep the original package's positional order
    (``params, max_lr, momentum, projection_fn, eps, adjusted_momentum``), so
    ``AliG(model.parameters(), 0.1, 0.9, proj)`` means what it means there.

    Args:
        params: parameters or parameter groups; a group may set ``max_lr``, ``momentum``
            and ``adjusted_momentum``.
        max_lr: cap on the step size, > 0. ``None`` means no cap: with a zero gradient the
            step is ``loss / eps`` and can be enormous, so prefer a cap.
        momentum: :math:`\mu \ge 0`; 0 disables momentum.
        projection_fn: a no-argument callable (e.g. :func:`bilevel.optim.l2_projection`)
            that projects the parameters in place; called once here and after every step,
            both times under ``torch.no_grad()``. AliG's regulariser is this constraint,
            not weight decay.
        eps: :math:`\epsilon \ge 0` in the denominator (global, not per group).
        adjusted_momentum: the PyTorch-like momentum form instead of the standard
            (Nesterov-like) one.

    Learning-rate schedulers: each group keeps ``lr`` as an alias of ``max_lr``.
    Schedulers change ``group["lr"]``, :meth:`step` reads it and mirrors it into
    ``group["max_lr"]``, so any ``torch.optim.lr_scheduler`` schedules the cap. To change
    the cap by hand, set ``group["lr"]``. Schedulers need a numeric ``max_lr`` (not None).

    After each step, ``step_size`` (0-d tensor: mean clipped step over groups) and
    ``step_size_unclipped`` (0-d tensor) hold the step sizes for logging.

    Example:
        >>> import torch
        >>> from bilevel.optim import AliG, l2_projection
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9,
        ...            projection_fn=l2_projection(model.parameters(), max_norm=10.0))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(torch.ones(4, 3)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        max_lr: float | None = None,
        momentum: float = 0.0,
        projection_fn: Callable[[], None] | None = None,
        eps: float = 1e-5,
        adjusted_momentum: bool = False,
    ) -> None:
        # Positional, in the original package's order (alig.th.AliG), so that code written
        # for it runs unchanged; hence no keyword-only marker here.
        alig.validate(None, 0.0, eps)
        self.eps = eps
        self.projection_fn = projection_fn
        self.step_size: Tensor | None = None
        self.step_size_unclipped: Tensor | None = None
        defaults = {
            "lr": max_lr,
            "max_lr": max_lr,
            "momentum": momentum,
            "adjusted_momentum": adjusted_momentum,
        }
        super().__init__(params, defaults)
        if projection_fn is not None:
            with torch.no_grad():  # it writes leaves that require grad in place
                projection_fn()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``max_lr`` and ``lr`` are aliases (giving both, they must agree)."""
        group = dict(param_group)
        if "max_lr" in group and "lr" in group and group["max_lr"] != group["lr"]:
            raise ConfigError(
                f"a param group sets max_lr={group['max_lr']} and lr={group['lr']}; they are "
                f"aliases in AliG. Set only max_lr."
            )
        if "max_lr" in group:
            group["lr"] = group["max_lr"]
        super().add_param_group(group)
        group = self.param_groups[-1]
        group["max_lr"] = group["lr"]
        alig.validate(group["lr"], group["momentum"], self.eps)

    def _loss(self, closure: Callable[[], Any] | None, loss: Any) -> Any:
        if closure is not None and loss is not None:
            raise ConfigError("AliG.step: pass either a closure or loss=, not both.")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ConfigError(
                "AliG.step needs the current mini-batch loss to set its step size. Call "
                "opt.step(closure) with a closure that returns the loss, or "
                "opt.step(loss=loss) after loss.backward()."
            )
        return loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:  # type: ignore[override]
        """One AliG step; returns the loss. Give ``closure`` (returning the loss) or ``loss``."""
        loss = self._loss(closure, loss)
        value = loss.detach() if isinstance(loss, Tensor) else loss
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise ConfigError("AliG does not support sparse gradients.")
        gamma_u = alig.unclipped_step_size(value, grads, eps=self.eps)
        sizes = []
        for group in self.param_groups:
            group["max_lr"] = group["lr"]  # lr is authoritative: schedulers write it
            gamma = alig.clip_step_size(gamma_u, group["lr"])
            sizes.append(gamma)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, gamma, group)
        self.step_size = torch.stack(sizes).mean()
        self.step_size_unclipped = gamma_u
        if self.projection_fn is not None:
            self.projection_fn()
        return loss

    def _update(self, p: Tensor, gamma: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        buf = None
        if group["momentum"] != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(p)
        new_p, new_buf = alig.update(
            p, p.grad, buf, step_size=gamma, momentum=group["momentum"],
            adjusted=group["adjusted_momentum"],
        )
        p.copy_(new_p)
        if new_buf is not None:
            state["momentum_buffer"] = new_buf
