"""Implicit hypergradients: at a fixed point, and online through the last update.

**Fixed point** (:func:`implicit`). If the inner state solves ``s* = Φ(s*, λ)`` with
``Φ = step(·, ·, t)``, the implicit function theorem gives

.. math:: \\frac{dL_V}{d\\lambda} = \\frac{\\partial L_V}{\\partial\\lambda}
   + \\Big(\\frac{\\partial \\Phi}{\\partial\\lambda}\\Big)^{\\!\\top}
     \\Big(I - \\frac{\\partial \\Phi}{\\partial s}\\Big)^{-\\top}
     \\frac{\\partial L_V}{\\partial s}.

For ``Φ = w − α∇_w L_T`` this is ``∂_λL_V − (∂²L_T/∂w∂λ)ᵀ H⁻¹ ∂_wL_V`` (Lorraine et al.;
the Neumann series reproduces theirs exactly). Solvers: ``neumann`` (K products),
``cg`` (symmetric positive definite: a minimum), ``minres`` (symmetric indefinite: a
saddle), ``identity`` (K = 0) and ``exact`` (dense).

Diagnostics that cannot be missed: a :class:`~bilevel.errors.HypergradWarning` when the
last Neumann term, or the CG/MINRES residual, is more than :data:`SERIES_RTOL` of the first
(the relative error of the result is about that fraction), and when ``state_star`` is not a
fixed point (``‖Φ(s) − s‖ > FIXED_POINT_RTOL·‖s‖`` over the leaves the step differentiates);
a Neumann series whose terms grow past the first raises
:class:`~bilevel.errors.NeumannDivergenceError` (or falls back, ``on_divergence``).

**One pass** (:func:`one_pass`, Clarke et al. 2022). Write one inner update as
``s_t = Φ(s_{t−1}, λ) = s_{t−1} − u(λ, s_{t−1})``. The outer loss is taken at ``s_t``
and the inverse is approximated by ``terms`` Neumann terms through ``∂Φ/∂s`` at
``s_{t−1}``: ``g_λ = (∂Φ/∂λ)ᵀ Σ_{j<terms} (∂Φ/∂s)^{⊤j} ∂L_V/∂s_t``, which equals
Clarke et al.'s ``−(∂u/∂λ)ᵀ p``. It returns the new state, so training goes on from it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from bilevel.errors import HypergradError, HypergradWarning, NeumannDivergenceError
from bilevel.hypergrad import linear_solve
from bilevel.hypergrad._common import (
    HypergradResult,
    OuterLossFn,
    StepFn,
    check_finite_result,
    checked_first_step,
    explain_autograd_errors,
    float_leaves,
    grads_or_zeros,
    hparam_leaves,
    prepare_state,
)
from bilevel.hypergrad._keywords import AuxSteps, neumann_terms, step_offset
from bilevel.tree import Tree, tree_detach, tree_flatten, tree_unflatten

SOLVERS = ("neumann", "cg", "minres", "identity", "exact")
SERIES_RTOL = 0.1  # last Neumann term / first, or final residual / ‖b‖, above which we warn
FIXED_POINT_RTOL = 1e-4  # ‖Φ(s) − s‖ / ‖s‖ above which state_star is not a fixed point


def implicit(
    step: StepFn,
    outer_loss: OuterLossFn,
    state_star: Tree,
    hparams: Tree,
    *,
    solver: str = "neumann",
    terms: int | None = None,
    iters: int | None = None,
    alpha: float = 1.0,
    start: int = 0,
    tol: float = 1e-10,
    max_dim: int = 4096,
    on_divergence: str = "raise",
    on_indefinite: str = "raise",
    check_finite: bool = True,
    has_aux: bool = False,
    t: int | None = None,
) -> HypergradResult:
    """Hypergradient at an (approximate) fixed point ``state_star`` of the step map.

    Args:
        step: pure ``step(state, hparams, t) -> state``; its fixed points are the inner
            solutions (e.g. one gradient step of the training loss).
        outer_loss: ``outer_loss(state, hparams) -> scalar``, evaluated at ``state_star``.
        state_star: the trained inner state (not modified).
        hparams: tree of floating tensors with ``requires_grad=True``.
        solver: ``"neumann"``, ``"cg"``, ``"minres"``, ``"identity"`` or ``"exact"``.
        terms: Neumann terms in total (default 11; ``terms=1`` is the identity), as in
            :func:`one_pass`. The old ``iters=K`` for Neumann (K + 1 terms) still works,
            with a DeprecationWarning.
        iters: the CG/MINRES iteration cap (default 10).
        alpha: Neumann damping/scale (see :mod:`bilevel.hypergrad.linear_solve`).
        start: the ``t`` passed to ``step`` (``t=`` is its deprecated old name).
        on_divergence: ``"raise"`` or ``"identity"`` (fall back to one term, reported in
            ``info["fallback"]``) when the Neumann series grows.
        has_aux: ``step`` returns ``(new_state, aux)``; ``r.aux`` is that aux, detached.
        on_indefinite: CG on a system that is not positive definite: ``"raise"`` or
            ``"continue"`` (carry on with negative curvature steps, as other libraries do;
            ``info["indefinite"]``). ``solver="minres"`` is correct there.

    ``info["fixed_point_residual"]`` is ``‖Φ(s) − s‖ / ‖s‖``; see the module docstring for
    the warnings.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if on_indefinite not in ("raise", "continue"):
        raise ValueError(f"on_indefinite must be 'raise' or 'continue', got {on_indefinite!r}")
    if on_divergence not in ("raise", "identity"):
        raise ValueError(f"on_divergence must be 'raise' or 'identity', got {on_divergence!r}")
    start = step_offset(start, t, method="implicit")
    if solver == "neumann":
        iters = neumann_terms(terms, iters, default=11, method="implicit") - 1
    elif terms is not None:
        raise TypeError(f"implicit: terms= counts Neumann terms; solver {solver!r} takes iters=")
    iters = 10 if iters is None else iters
    h_leaves = hparam_leaves(hparams)
    s = prepare_state(state_star)
    step = aux_steps = AuxSteps(step, has_aux)
    with explain_autograd_errors(f"implicit(solver={solver!r})"):
        loss = outer_loss(s, hparams)
        s_leaves = float_leaves(s)
        g = torch.autograd.grad(loss, s_leaves + h_leaves, allow_unused=True)
        g_s, direct = grads_or_zeros(g[: len(s_leaves)], s_leaves), g[len(s_leaves) :]
        phi = float_leaves(checked_first_step(step, s, hparams, start))
        x, info = _solve(phi, s_leaves, g_s, solver, iters, alpha, tol, max_dim, on_divergence,
                         on_indefinite=on_indefinite, detect_growth=True)
        indirect = _vjp_h(phi, h_leaves, x)
    hyper = _total(direct, indirect, h_leaves)
    if check_finite:
        check_finite_result(loss.detach(), hyper, "implicit")
    h_def = tree_flatten(hparams)[1]
    info |= {"solver": solver, "fixed_point_residual": _fixed_point_residual(phi, s_leaves)}
    _warn_unconverged(info, solver, iters, alpha)
    return HypergradResult(tree_unflatten(h_def, hyper), tree_detach(state_star), loss.detach(), info,
                           aux_steps.by_t.get(start))


def one_pass(
    step: Any,
    outer_loss: OuterLossFn,
    state: Tree,
    hparams: Tree,
    *,
    terms: int = 5,
    start: int = 0,
    has_aux: bool = False,
    on_divergence: str = "raise",
    check_finite: bool = True,
    t: int | None = None,
) -> HypergradResult:
    """Take one inner step and return its one-pass implicit hypergradient (Clarke et al.).

    Args:
        step: ``step(state, hparams, t) -> new_state`` or, with ``has_aux=True``,
            ``-> (new_state, aux)``; ``aux`` (e.g. a momentum buffer from earlier steps,
            which Clarke et al. treat as a constant) is returned detached and not
            differentiated.
        terms: number of Neumann terms in total (Clarke et al.'s ``i``; 1 = identity).
        start: the ``t`` passed to ``step`` (``t=`` is its deprecated old name).
        on_divergence: ``"raise"`` or ``"identity"`` (fall back to one term).

    A hyperparameter that does not reach the update yet (momentum while its buffer is
    zero, on the first step) gets a zero hypergradient.
    """
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    start = step_offset(start, t, method="one_pass")
    h_leaves = hparam_leaves(hparams)
    s = prepare_state(state)
    with explain_autograd_errors("one_pass"):
        out = checked_step_aux(step, s, hparams, start, has_aux)
        new, aux = out if has_aux else (out, None)
        new_leaves = float_leaves(new)
        # Outer loss at the new state, with the new state as its own leaf.
        new_in = prepare_state(new)
        loss = outer_loss(new_in, hparams)
        at = float_leaves(new_in)
        g = torch.autograd.grad(loss, at + h_leaves, allow_unused=True)
        g_new, direct = grads_or_zeros(g[: len(at)], at), g[len(at) :]
        x, info = _solve(
            new_leaves, float_leaves(s), g_new, "neumann", terms - 1, 1.0, 0.0, 0, on_divergence
        )
        indirect = _vjp_h(new_leaves, h_leaves, x)
    hyper = _total(direct, indirect, h_leaves)
    if check_finite:
        check_finite_result(loss.detach(), hyper, "one_pass")
    h_def = tree_flatten(hparams)[1]
    return HypergradResult(
        tree_unflatten(h_def, hyper), tree_detach(new), loss.detach(), info,
        tree_detach(aux) if aux is not None else None,
    )


def checked_step_aux(step: Any, s: Tree, hparams: Tree, t: int, has_aux: bool) -> Any:
    if not has_aux:
        return checked_first_step(step, s, hparams, t)
    holder: list[Any] = []

    def state_only(st: Tree, h: Tree, tt: int) -> Tree:
        new, aux = step(st, h, tt)
        holder.append(aux)
        return new

    new = checked_first_step(state_only, s, hparams, t)
    return new, holder[0]


def _fixed_point_residual(phi: list[torch.Tensor], s_leaves: list[torch.Tensor]) -> float:
    """``‖Φ(s) − s‖ / ‖s‖`` over the leaves the step differentiates (leaves it updates
    without a graph, such as BatchNorm running statistics, are not inner variables)."""
    pairs = [(p.detach(), x.detach()) for p, x in zip(phi, s_leaves, strict=True) if p.requires_grad]
    if not pairs:
        return 0.0
    if any(x.is_meta for _, x in pairs):
        return math.nan  # shapes only: nothing to check
    r = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - x) for p, x in pairs]))
    n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for _, x in pairs]))
    return float(r / n.clamp_min(1e-30))


def _warn_unconverged(info: dict, solver: str, iters: int, alpha: float) -> None:
    where = f"implicit(solver={solver!r})"
    norms = info.get("term_norms")
    if norms and len(norms) > 1 and norms[0] > 0 and norms[-1] > SERIES_RTOL * norms[0]:
        ratio, k = norms[-1] / norms[0], len(norms) - 1
        rate = ratio ** (1.0 / k)
        hint = (f"at this rate about {math.ceil(math.log(SERIES_RTOL) / math.log(rate))} terms "
                f"bring it below {SERIES_RTOL:g}" if rate < 1 else "the terms are not shrinking")
        warnings.warn(
            f"{where}: the last Neumann term is {ratio:.2g} of the first after {k + 1} terms "
            f"(alpha={alpha}), so the series has not converged and the hypergradient is off by "
            f"roughly that fraction; {hint}. Raise terms or alpha (alpha < 2 / (lr * largest "
            "curvature)), or use solver='cg'. See docs/hypergrad.md, 'Choosing K and alpha'.",
            HypergradWarning, stacklevel=3,
        )
    res = info.get("residual")
    if res is not None and res > SERIES_RTOL:
        warnings.warn(
            f"{where}: the residual after {info['iterations']} iterations is {res:.2g} of the "
            f"first, so the solve has not converged (iters={iters}); raise iters.",
            HypergradWarning, stacklevel=3,
        )
    fp = info["fixed_point_residual"]
    if fp > FIXED_POINT_RTOL:
        warnings.warn(
            f"{where}: state_star is not a fixed point of the step map: ‖Φ(s) − s‖ is {fp:.2g} "
            f"of ‖s‖ (above {FIXED_POINT_RTOL:g}). The implicit function theorem holds at a "
            "fixed point; train the inner problem closer to convergence, or use "
            "hypergrad.unrolled for a state that is still moving.",
            HypergradWarning, stacklevel=3,
        )


def _solve(
    phi: list[torch.Tensor], s_leaves: list[torch.Tensor], b: list[torch.Tensor],
    solver: str, iters: int, alpha: float, tol: float, max_dim: int, on_divergence: str,
    *, on_indefinite: str = "raise", detect_growth: bool = False,
) -> tuple[list[torch.Tensor], dict]:
    if len(phi) != len(s_leaves):
        raise HypergradError(
            "the step map changed which state leaves are floating-point; keep dtypes fixed."
        )

    # Outputs with no graph (e.g. BatchNorm running statistics) contribute nothing.
    live = [i for i, p in enumerate(phi) if p.requires_grad]

    def jt(v: list[torch.Tensor]) -> list[torch.Tensor]:
        if not live:
            return [torch.zeros_like(x) for x in s_leaves]
        out = torch.autograd.grad(
            [phi[i] for i in live], s_leaves, [v[i] for i in live],
            retain_graph=True, allow_unused=True,
        )
        return grads_or_zeros(out, s_leaves)

    if solver == "identity":
        return [alpha * x for x in b], {}
    if solver == "cg":
        return linear_solve.cg(jt, b, iters=iters, tol=tol, on_indefinite=on_indefinite)
    if solver == "minres":
        return linear_solve.minres(jt, b, iters=iters, tol=tol)
    if solver == "exact":
        def jt_batched(eye: torch.Tensor) -> list[torch.Tensor]:
            vs, i = [], 0
            for x in phi:
                vs.append(eye[:, i : i + x.numel()].reshape(eye.shape[0], *x.shape))
                i += x.numel()
            out = torch.autograd.grad(
                [phi[i] for i in live], s_leaves, [vs[i] for i in live],
                retain_graph=True, allow_unused=True, is_grads_batched=True,
            )
            return [torch.zeros(eye.shape[0], *x.shape, dtype=x.dtype, device=x.device) if o is None else o
                    for o, x in zip(out, s_leaves, strict=True)]

        return linear_solve.exact(jt_batched, b, max_dim=max_dim)
    try:
        return linear_solve.neumann(jt, b, iters=iters, alpha=alpha, detect_growth=detect_growth)
    except NeumannDivergenceError:
        if on_divergence == "raise":
            raise
        return [alpha * x for x in b], {"fallback": "identity"}


def _vjp_h(
    outs: list[torch.Tensor], h_leaves: list[torch.Tensor], v: list[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    if not live:
        return (None,) * len(h_leaves)
    return torch.autograd.grad(
        [outs[i] for i in live], h_leaves, [v[i] for i in live], allow_unused=True
    )


def _total(
    direct: tuple[torch.Tensor | None, ...], indirect: tuple[torch.Tensor | None, ...],
    like: list[torch.Tensor],
) -> list[torch.Tensor]:
    out = []
    for d, i, x in zip(direct, indirect, like, strict=True):
        total = torch.zeros_like(x)
        if d is not None:
            total = total + d
        if i is not None:
            total = total + i
        out.append(total)
    return out
