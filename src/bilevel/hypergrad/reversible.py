"""Exact hypergradients through long SGD-with-momentum runs in flat memory, by reversal.

:func:`reversible` trains ``w`` for T steps of SGD with momentum (torch's convention, the
same update as :func:`bilevel.optim.sgd.step` without dampening),

.. math:: v_{t+1} = \\gamma_t v_t + \\nabla_w L_T(w_t, \\lambda, t) + \\beta_t w_t, \\qquad
          w_{t+1} = w_t - \\alpha_t v_{t+1},

then returns the exact ``dL_V(w_T, λ)/dλ`` by running the training *backwards* (Maclaurin,
Duvenaud & Adams, ICML 2015): each reverse step recomputes ``w_t`` and ``v_t`` from
``w_{t+1}`` and ``v_{t+1}`` and back-propagates through that one step with a vector-Jacobian
product. Nothing per step is stored but the bits the momentum decay destroys, so memory is
O(weights) plus ``2(1 - γ)`` bits per weight per step for ``γ ≥ 1/2`` (0.2 bits at
``γ = 0.9``, at most 4 at ``γ = 1/16``), where :func:`unrolled` holds every step's graph.

Reversal is exact because ``w`` and ``v`` are held in fixed point (int64 counting units of
``2**-bits``; :mod:`bilevel.hypergrad._exact`): additions of quantised floats are undone by
subtraction, and the multiply by ``γ`` saves what it destroys in an information buffer. The
trajectory is therefore the float one rounded to ``2**-bits`` at every step (``bits=44``:
5.7e-14), and ``γ`` is applied as the rational ``round(γ 2**31) / 2**31``. The run's end is
checked: the reversed trajectory must land on ``w_0`` and ``v_0`` bit for bit, else
:class:`HypergradError`.

Schedules (``lr``, ``momentum``, ``weight_decay``) are a number, a tensor (0-d or
broadcastable to every weight tensor), a tree shaped like ``w0`` (one value or tensor per
weight tensor), or a callable ``(hparams, t) -> any of those``: that is how per-step
schedules and learned values enter (``lr=lambda h, t: 10 ** h["log_lr"][t // 100]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bilevel.errors import HypergradError, NonFiniteError
from bilevel.hypergrad import _exact
from bilevel.hypergrad._common import (
    HypergradResult,
    check_finite_result,
    grads_or_zeros,
    hparam_leaves,
)
from bilevel.tree import Tree, TreeDef, tree_flatten, tree_paths, tree_unflatten

LossFn = Callable[[Tree, Tree, int], torch.Tensor]
Schedule = float | torch.Tensor | Tree | Callable[[Tree, int], Any]


def reversible(
    loss_fn: LossFn,
    outer_loss: Callable[[Tree, Tree], torch.Tensor],
    w0: Tree,
    hparams: Tree,
    *,
    steps: int,
    lr: Schedule,
    momentum: Schedule = 0.9,
    weight_decay: Schedule = 0.0,
    velocity0: Tree | None = None,
    bits: int = 44,
    start: int = 0,
    check_finite: bool = True,
) -> HypergradResult:
    """``dL_V/dλ`` through ``steps`` steps of SGD with momentum, by exact reversal.

    Args:
        loss_fn: training loss ``loss_fn(w, hparams, t) -> scalar``; its gradient in ``w``
            drives step ``t``. It must be deterministic in ``(w, hparams, t)``: take the
            minibatch and any randomness from ``t`` (e.g. ``torch.Generator().manual_seed(t)``).
        outer_loss: ``outer_loss(w_T, hparams) -> scalar``.
        w0: initial weights, a tree of floating tensors (not modified).
        hparams: tree of floating tensors with ``requires_grad=True``.
        steps: number of SGD steps T (t runs from ``start`` to ``start + T - 1``).
        lr, momentum, weight_decay: schedules (see the module docstring). Momentum must stay
            in ``[1/16, 1]`` (below, the buffer would grow by more than 4 bits per step).
        velocity0: initial velocity (default zeros).
        bits: fixed-point fraction bits; weights, velocities and steps must stay below
            ``2**(58 - bits)`` in magnitude (``bits=44``: 16384).
        start: index of the first step.
        check_finite: detect NaN/inf and fixed-point overflow in the forward run (one host
            sync) and in the loss and hypergradient.

    Returns:
        :class:`HypergradResult`: ``hypergrad`` shaped like ``hparams``; ``state`` the final
        weights ``w_T``; ``info`` with ``grad_w0`` (``dL_V/dw_0``), ``velocity`` (``v_T``),
        ``buffer_bytes`` (the information buffer held at its largest) and
        ``bits_per_weight_step`` (the information spilled into it), and ``exact`` (the reversal landed on ``w_0``, ``v_0``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 8 <= bits <= 52:
        raise ValueError(f"bits must be in [8, 52] (fraction bits of the fixed point), got {bits}")
    h_leaves = hparam_leaves(hparams)
    leaves, w_def = tree_flatten(w0)
    for path, x in tree_paths(w0):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise HypergradError(f"w0 leaf {path!r} must be a floating-point tensor; "
                                 "reversible trains every leaf of w0")
    traj = _Trajectory(loss_fn, w_def, leaves, bits)
    if velocity0 is not None:
        traj.v = _exact.to_fixed(traj.flat(tree_flatten(velocity0)[0]), bits)
    w_start, v_start = traj.w.clone(), traj.v.clone()
    h_def = tree_flatten(hparams)[1]
    h_const = tree_unflatten(h_def, [x.detach() for x in h_leaves])
    scheds = (lr, momentum, weight_decay)

    # the first step whose flag is False, kept in one tensor: O(1) memory, one sync at the end
    first_bad = torch.full((), -1, dtype=torch.int64, device=traj.w.device)
    for t in range(start, start + steps):
        ok = traj.forward(h_const, t, *(traj.values(s, h_const, t, n) for s, n in zip(scheds, _NAMES, strict=True)))
        if check_finite:
            first_bad = torch.where(~ok & (first_bad < 0), t, first_bad)
    _raise_if_bad(int(first_bad), bits)
    buffer_bytes, spilled = traj.buffer.nbytes, traj.buffer.spilled_bytes

    w_final = traj.float_leaves(traj.w, requires_grad=True)
    loss = outer_loss(tree_unflatten(w_def, w_final), hparams)
    dw = grads_or_zeros(torch.autograd.grad(loss, [*w_final, *h_leaves], allow_unused=True), [*w_final, *h_leaves])
    dw, hyper = dw[:len(w_final)], dw[len(w_final):]
    dv = [torch.zeros_like(x) for x in dw]
    final_w, final_v = tree_unflatten(w_def, [x.detach() for x in w_final]), traj.v_tree()
    for t in range(start + steps - 1, start - 1, -1):
        dw, dv, dh = traj.reverse(hparams, h_leaves, h_const, t, scheds, dw, dv)
        hyper = [a + b for a, b in zip(hyper, dh, strict=True)]
    exact = torch.equal(traj.w, w_start) and torch.equal(traj.v, v_start) and traj.buffer.empty
    if not exact:
        raise HypergradError(
            "reversible: the reversed trajectory did not return to w0 bit for bit, so loss_fn "
            "gave different gradients forward and backward. It must be deterministic in "
            "(w, hparams, t): take minibatches and random numbers from t (a generator seeded "
            "by t), and avoid nondeterministic kernels (torch.use_deterministic_algorithms)."
        )
    if check_finite:
        check_finite_result(loss.detach(), hyper, "reversible")
    numel = traj.w.numel()
    info = {"steps": steps, "bits": bits, "exact": exact, "buffer_bytes": buffer_bytes,
            "bits_per_weight_step": 8 * spilled / (numel * steps),
            "grad_w0": tree_unflatten(w_def, dw), "velocity": final_v}
    return HypergradResult(tree_unflatten(h_def, hyper), final_w, loss.detach(), info)


_NAMES = ("lr", "momentum", "weight_decay")


class _Trajectory:
    """Fixed-point weights ``w`` and velocity ``v`` (flat int64) and the buffer."""

    def __init__(self, loss_fn: LossFn, w_def: TreeDef, leaves: list[torch.Tensor], bits: int) -> None:
        self.loss_fn, self.w_def, self.bits = loss_fn, w_def, bits
        self.shapes = [x.shape for x in leaves]
        self.dtypes = [x.dtype for x in leaves]
        self.sizes = [x.numel() for x in leaves]
        self.w = _exact.to_fixed(self.flat([x.detach() for x in leaves]), bits)
        self.v = torch.zeros_like(self.w)
        self.buffer = _exact.InfoBuffer(self.w.numel(), self.w.device)

    def flat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """One float64 vector over all weights; a 0-d tensor when one value serves all."""
        if all(x is xs[0] for x in xs) and xs[0].dim() == 0:
            return xs[0].detach().double()
        return torch.cat([x.detach().double().expand(s).reshape(-1) for x, s in zip(xs, self.shapes, strict=True)])

    def float_leaves(self, x: torch.Tensor, *, requires_grad: bool = False) -> list[torch.Tensor]:
        parts = _exact.to_float(x, self.bits).split(self.sizes)
        return [p.view(s).to(d).requires_grad_(requires_grad)
                for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)]

    def v_tree(self) -> Tree:
        return tree_unflatten(self.w_def, self.float_leaves(self.v))

    def values(self, sched: Schedule, h: Tree, t: int, name: str) -> list[torch.Tensor]:
        """The schedule at step t, one tensor per weight tensor, broadcast-checked."""
        spec = sched(h, t) if callable(sched) else sched
        if isinstance(spec, (dict, list, tuple)):
            vals, spec_def = tree_flatten(spec)
            if spec_def != self.w_def:
                raise HypergradError(f"{name}: a tree schedule must have the structure of w0 "
                                     "(one value per weight tensor); give a number or a tensor otherwise")
        else:
            vals = [spec] * len(self.shapes)
        out = []
        for v, shape in zip(vals, self.shapes, strict=True):
            v = torch.as_tensor(v, dtype=torch.float64, device=self.w.device) if not isinstance(v, torch.Tensor) else v
            if not _broadcasts(v.shape, shape):
                raise HypergradError(f"{name}: a value of shape {tuple(v.shape)} does not broadcast "
                                     f"to the weight shape {tuple(shape)}")
            out.append(v)
        return out

    def _gradient(self, wf: list[torch.Tensor], h: Tree, t: int, *, create_graph: bool) -> list[torch.Tensor]:
        with torch.enable_grad():
            loss = self.loss_fn(tree_unflatten(self.w_def, wf), h, t)
            g = torch.autograd.grad(loss, wf, allow_unused=True, create_graph=create_graph)
        return grads_or_zeros(g, wf)

    def _increment(self, g: list[torch.Tensor], wd: list[torch.Tensor]) -> torch.Tensor:
        """∇L + β w in float64, from which both directions quantise the same bits."""
        return self.flat(g) + self.flat(wd) * _exact.to_float(self.w, self.bits)

    def _move(self, lr: list[torch.Tensor]) -> torch.Tensor:
        """α v in float64: the weight decrement before quantisation."""
        return self.flat(lr) * _exact.to_float(self.v, self.bits)

    def forward(self, h: Tree, t: int, lr: list[torch.Tensor], mom: list[torch.Tensor],
                wd: list[torch.Tensor]) -> torch.Tensor:
        """One SGD-momentum step in place on ``w``, ``v``; returns a 0-d 'all fine' flag."""
        g = self._gradient(self.float_leaves(self.w, requires_grad=True), h, t, create_graph=False)
        gamma, inc = self.flat(mom), self._increment(g, wd)
        ok = _exact.in_range(inc, self.bits) & _exact.momentum_ok(gamma)
        self.v = _exact.mul(self.v, _exact.numerator(gamma), self.buffer) + _exact.to_fixed(inc, self.bits)
        move = self._move(lr)
        ok &= _exact.in_range(move, self.bits) & _exact.in_range(_exact.to_float(self.v, self.bits), self.bits)
        self.w = self.w - _exact.to_fixed(move, self.bits)
        return ok & _exact.in_range(_exact.to_float(self.w, self.bits), self.bits)

    def reverse(self, hparams: Tree, h_leaves: list[torch.Tensor], h_const: Tree, t: int,
                scheds: tuple[Schedule, ...], dw: list[torch.Tensor], dv: list[torch.Tensor]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Undo step ``t`` exactly, then back-propagate ``(dw, dv)`` through it."""
        lr_c, mom_c, wd_c = (self.values(s, h_const, t, n) for s, n in zip(scheds, _NAMES, strict=True))
        self.w = self.w + _exact.to_fixed(self._move(lr_c), self.bits)  # w_t, from w_{t+1} and v_{t+1}
        wf = self.float_leaves(self.w, requires_grad=True)
        with torch.enable_grad():
            g = self._gradient(wf, hparams, t, create_graph=True)
            y = self.v - _exact.to_fixed(self._increment([x.detach() for x in g], wd_c), self.bits)
            self.v = _exact.unmul(y, _exact.numerator(self.flat(mom_c)), self.buffer)  # v_t
            vf = self.float_leaves(self.v, requires_grad=True)
            lr, mom, wd = (self.values(s, hparams, t, n) for s, n in zip(scheds, _NAMES, strict=True))
            outs = []
            for w_, v_, g_, a, m, b in zip(wf, vf, g, lr, mom, wd, strict=True):
                # evaluate at the momentum the fixed point really applied (n / 2**31)
                m = m + (_exact.quantised(m.detach()) - m.detach()).to(m.dtype)
                v_next = m * v_ + g_ + b * w_
                outs += [(w_ - a * v_next).to(w_.dtype), v_next.to(w_.dtype)]
            grads = torch.autograd.grad(
                outs, [*wf, *vf, *h_leaves],
                grad_outputs=[c for pair in zip(dw, dv, strict=True) for c in pair], allow_unused=True,
            )
        grads = grads_or_zeros(grads, [*wf, *vf, *h_leaves])
        n = len(wf)
        return grads[:n], grads[n:2 * n], grads[2 * n:]


def _broadcasts(small: torch.Size, big: torch.Size) -> bool:
    """``small`` broadcasts to ``big`` without changing it (torch.broadcast_shapes is slow)."""
    if len(small) > len(big):
        return False
    return all(a in (1, b) for a, b in zip(reversed(small), reversed(big), strict=False))


def _raise_if_bad(bad: int, bits: int) -> None:
    if bad >= 0:
        raise NonFiniteError(
            f"reversible: at step {bad} a gradient, weight or velocity was NaN/infinite or left "
            f"the fixed-point range |x| < 2**{_exact.MAX_ABS_BITS - bits} (bits={bits}), or the "
            f"momentum left [1/16, 1]. Lower the learning rate, or lower bits for more range.",
            step=bad, what="state",
        )
