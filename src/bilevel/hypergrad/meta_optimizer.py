"""AuxiLearn's ``MetaOptimizer``: an implicit hypergradient step on auxiliary parameters.

A drop-in for ``auxilearn.optim.MetaOptimizer`` (Navon et al., ICLR 2021), computed with the
engine's linear solvers (:mod:`bilevel.hypergrad.linear_solve`). Given *fresh* losses with
graphs, a training loss :math:`L_T(w, φ)` and a validation loss :math:`L_V(w)`, one
:meth:`MetaOptimizer.step` writes to ``φ.grad``

.. math:: g_φ = \\frac{\\partial L_V}{\\partial φ}
   - \\Big(\\frac{\\partial^2 L_T}{\\partial w\\,\\partial φ}\\Big)^{\\!\\top} p, \\qquad
   p = c \\sum_{j=0}^{K} (I - αH)^j \\frac{\\partial L_V}{\\partial w},
   \\quad H = \\frac{\\partial^2 L_T}{\\partial w^2},

clips its total norm to ``max_grad_norm`` and calls the wrapped optimiser's ``step()``.

Conventions (the seed's, tested against dense computations in float64):

* **Unscaled Neumann sum.** ``α = hpo_lr``, ``K = truncate_iter``; with ``neumann_scale="none"``
  (the seed's) ``c = 1``, so ``p → (αH)⁻¹ ∂L_V/∂w`` and ``g_φ`` is ``1/α`` times the implicit
  hypergradient. ``neumann_scale="alpha"`` sets ``c = α`` (Lorraine et al.), which converges
  to the exact implicit hypergradient as ``K → ∞``.
* **Sign.** ``g_φ`` is the derivative of ``L_V`` (the seed returns ``−(∂g/∂φ)ᵀp``), so the
  wrapped optimiser *descends* it, as for any ``.grad``.
* **Direct term.** The seed assumes ``∂L_V/∂φ = 0``; here it is added when ``val_loss``
  depends on ``φ`` (it is zero otherwise, so seed results are unchanged).
* **Unused tensors.** A weight that does not reach ``val_loss`` (an auxiliary head) or
  ``train_loss``, and an auxiliary parameter that does not reach ``train_loss``, contributes
  zero; the seed crashed on the ``None`` gradients (its issue #6).
* ``parameters`` and ``aux_params`` may be any iterables, generators included: each is read
  once (the seed iterated them several times, so its README's generators were exhausted).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch.nn.utils import clip_grad_norm_

from bilevel.errors import HypergradError, NeumannDivergenceError
from bilevel.hypergrad import linear_solve

NEUMANN_SCALES = ("none", "alpha")
SOLVERS = ("neumann", "cg")
_SETTINGS = ("hpo_lr", "truncate_iter", "max_grad_norm", "neumann_scale", "solver",
             "on_divergence")


class MetaOptimizer:
    """Implicit-differentiation meta-optimiser over auxiliary parameters (AuxiLearn API).

    Args:
        meta_optimizer: a ``torch.optim.Optimizer`` over the auxiliary parameters ``φ``.
        hpo_lr: the Neumann step ``α`` (AuxiLearn uses the primary learning rate); > 0.
        truncate_iter: ``K``, the Neumann terms after the first (0: identity, ``p = v``).
            With ``solver="cg"`` the CG iteration cap.
        max_grad_norm: clip the total hypergradient norm to this (``None``: no clipping).
        neumann_scale: ``"none"`` (the seed's unscaled sum) or ``"alpha"`` (× α, Lorraine).
        solver: ``"neumann"`` (the seed's) or ``"cg"`` (solves ``αH p = v``; needs ``H ≻ 0``).
        on_divergence: ``"raise"`` (:class:`NeumannDivergenceError`) or ``"identity"``
            (use ``p = c·v``, recorded in ``last_info["fallback"]``) when the series grows.

    Example:
        >>> import torch
        >>> w = torch.zeros(3, requires_grad=True)
        >>> phi = torch.ones(3, requires_grad=True)
        >>> meta = MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.5)
        >>> train_loss = (phi * (w - 1.0) ** 2).sum()
        >>> val_loss = ((w - 2.0) ** 2).sum()
        >>> meta.step(train_loss=train_loss, val_loss=val_loss, parameters=[w],
        ...           aux_params=[phi])
        >>> phi.grad.shape
        torch.Size([3])
    """

    def __init__(
        self,
        meta_optimizer: torch.optim.Optimizer,
        hpo_lr: float,
        truncate_iter: int = 3,
        max_grad_norm: float | None = 10,
        *,
        neumann_scale: str = "none",
        solver: str = "neumann",
        on_divergence: str = "raise",
    ) -> None:
        if not (hasattr(meta_optimizer, "step") and hasattr(meta_optimizer, "zero_grad")):
            raise TypeError("meta_optimizer must be a torch.optim.Optimizer over the auxiliary "
                            f"parameters, got {type(meta_optimizer).__name__}")
        self.meta_optimizer = meta_optimizer
        self.hpo_lr, self.truncate_iter, self.max_grad_norm = hpo_lr, truncate_iter, max_grad_norm
        self.neumann_scale, self.solver, self.on_divergence = neumann_scale, solver, on_divergence
        _check_settings(self.settings())
        self.last_info: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        """The constructor's settings, by name."""
        return {k: getattr(self, k) for k in _SETTINGS}

    def zero_grad(self) -> None:
        """Zero the wrapped optimiser's gradients."""
        self.meta_optimizer.zero_grad()

    def step(
        self,
        train_loss: torch.Tensor,
        val_loss: torch.Tensor,
        parameters: Iterable[torch.Tensor],
        aux_params: Iterable[torch.Tensor],
        return_grads: bool = False,
    ) -> list[torch.Tensor] | None:
        """Write the hypergradient to ``φ.grad``, clip it, and step the meta-optimiser.

        Args:
            train_loss: scalar ``L_T(w, φ)`` with its graph (computed after the last update).
            val_loss: scalar ``L_V(w)`` with its graph (usually independent of ``φ``).
            parameters: the primary weights ``w`` (list or generator).
            aux_params: the auxiliary parameters ``φ`` (list or generator).
            return_grads: also return the gradients written to ``φ.grad`` (after clipping,
                as in the seed, where clipping scales them in place).

        Both graphs are consumed. ``last_info`` holds ``grad_norm`` (before clipping),
        ``clipped`` and the solver's diagnostics.
        """
        params, aux = _tensors(parameters, "parameters"), _tensors(aux_params, "aux_params")
        self.zero_grad()
        grads, info = self.hypergradient(train_loss=train_loss, val_loss=val_loss,
                                         parameters=params, aux_params=aux)
        for p, g in zip(aux, grads, strict=True):
            p.grad = g
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        info |= {"grad_norm": float(norm), "clipped": False}
        if self.max_grad_norm is not None:
            clip_grad_norm_(aux, max_norm=self.max_grad_norm)
            info["clipped"] = float(norm) > self.max_grad_norm
        self.last_info = info
        self.meta_optimizer.step()
        return grads if return_grads else None

    def hypergradient(
        self, *, train_loss: torch.Tensor, val_loss: torch.Tensor,
        parameters: list[torch.Tensor], aux_params: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """``(g_φ, info)`` without touching ``.grad`` or stepping (see the module docstring)."""
        n = len(parameters)
        for name, loss in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise HypergradError(f"{name} must be a scalar tensor with a graph (compute it "
                                     "fresh, outside torch.no_grad()); got "
                                     f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
        g_val = torch.autograd.grad(val_loss, parameters + aux_params, allow_unused=True)
        v = [_or_zeros(g, p) for g, p in zip(g_val[:n], parameters, strict=True)]
        g_tr = torch.autograd.grad(train_loss, parameters, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(g_tr) if g is not None and g.requires_grad]
        alpha = float(self.hpo_lr)

        def jt(vec: list[torch.Tensor]) -> list[torch.Tensor]:  # (I - αH) vec
            if not live:
                return list(vec)
            hv = torch.autograd.grad([g_tr[i] for i in live], parameters,
                                     [vec[i] for i in live], retain_graph=True, allow_unused=True)
            return [x - alpha * _or_zeros(h, x) for x, h in zip(vec, hv, strict=True)]

        p, info = self._solve(jt, v)
        scale = alpha if self.neumann_scale == "alpha" else 1.0
        cross = (torch.autograd.grad([g_tr[i] for i in live], aux_params,
                                     [p[i] for i in live], allow_unused=True)
                 if live else (None,) * len(aux_params))
        out = []
        for d, c, phi in zip(g_val[n:], cross, aux_params, strict=True):
            g = torch.zeros_like(phi) if d is None else d.detach().clone()
            out.append(g if c is None else g - scale * c)
        return out, info

    def _solve(self, jt: Any, v: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        if self.solver == "cg":  # (I - (I - αH)) p = αH p = v
            return linear_solve.cg(jt, v, iters=max(self.truncate_iter, 1))
        try:
            return linear_solve.neumann(jt, v, iters=self.truncate_iter)
        except NeumannDivergenceError:
            if self.on_divergence == "raise":
                raise
            return list(v), {"fallback": "identity"}

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimiser's state and this wrapper's settings."""
        return {"meta_optimizer": self.meta_optimizer.state_dict(), "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (settings included, like ``torch.optim``'s groups).

        The state is deep-copied first: ``torch.optim`` would otherwise share tensors (Adam's
        ``step`` counter) with the optimiser the dict came from and advance both.
        """
        missing = {"meta_optimizer", "settings"} - set(state)
        if missing:
            raise KeyError(f"MetaOptimizer state_dict lacks {sorted(missing)}; pass the dict "
                           "returned by MetaOptimizer.state_dict()")
        _check_settings(state["settings"])
        self.meta_optimizer.load_state_dict(copy.deepcopy(state["meta_optimizer"]))
        for k in _SETTINGS:
            setattr(self, k, state["settings"][k])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"MetaOptimizer({type(self.meta_optimizer).__name__}, {args})"


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _tensors(xs: Iterable[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor):
        xs = [xs]
    out = list(xs)  # read a generator exactly once
    if not out:
        raise ValueError(f"{name} is empty (an exhausted generator?): pass the tensors, e.g. "
                         f"list(model.parameters())")
    for i, x in enumerate(out):
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            raise HypergradError(f"{name}[{i}] must be a tensor that requires grad, got "
                                 f"{type(x).__name__}")
    return out


def _check_settings(s: dict[str, Any]) -> None:
    if not s["hpo_lr"] > 0:
        raise ValueError(f"hpo_lr must be > 0 (the Neumann step α), got {s['hpo_lr']}")
    if not (isinstance(s["truncate_iter"], int) and s["truncate_iter"] >= 0):
        raise ValueError(f"truncate_iter must be an int >= 0, got {s['truncate_iter']!r}")
    if s["max_grad_norm"] is not None and not s["max_grad_norm"] > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {s['max_grad_norm']}")
    for key, allowed in (("neumann_scale", NEUMANN_SCALES), ("solver", SOLVERS),
                         ("on_divergence", ("raise", "identity"))):
        if s[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {s[key]!r}")
