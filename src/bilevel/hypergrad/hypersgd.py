r"""``HyperSGD``: SGD that learns its own learning rate, weight decay and momentum while it
trains (Clarke et al. 2022's one-pass hypergradients; Baydin et al. 2018's greedy ones).

The weight update is ``torch.optim.SGD``'s with coupled weight decay (dampening 0), through
:func:`bilevel.optim.sgd.step`:

.. math:: d = \nabla L_T(w) + \mathrm{wd}\,w,\qquad b \leftarrow \mu b + d,\qquad
          w \leftarrow w - \eta\, b

(the gradient optionally scaled by ``min(1, c / (‖∇L_T‖ + 10⁻⁶))``, ``grad_clip=c``).
Every ``hyper_every`` (T) steps, after the T-th update :math:`w_T = Φ(w_{T-1}, λ)`, the
hyper-step takes the hypergradient of a validation loss with respect to the stored
hyperparameters :math:`λ` (``log10 lr``, ``log10 wd``, ``logit momentum``; scalar, per
tensor or per element) and moves them with the hyper-optimiser (Adam at ``hyper_lr``):

.. math:: g_λ = \Big(\frac{\partial Φ}{\partial λ}\Big)^{\!\top}
          \sum_{j<i} \Big(\frac{\partial Φ}{\partial w}\Big)^{\!\top j}
          \nabla_w L_V(w_T),

``i = terms`` (Clarke's one-pass, the momentum buffer of earlier steps a constant:
exactly :func:`bilevel.hypergrad.one_pass`); ``method="greedy"`` is ``i = 1``, the one-step
unrolled hypergradient (Baydin et al. when the closure is the next training batch's loss).
``log10 lr`` is clipped to ``lr_bounds`` after each hyper-step.

Use::

    opt = HyperSGD(model.parameters(), lr=0.01, weight_decay=1e-4, momentum=0.5,
                   learn=("lr", "weight_decay", "momentum"), hyper_every=10)
    for x, y in batches:
        opt.step(lambda: F.cross_entropy(model(x), y))      # the closure returns the loss
        opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))  # acts every hyper_every steps

Conventions:

* The closure returns the loss and does **not** call ``backward()``: the optimiser
  differentiates it (twice, on a hyper-step). ``step()`` without a closure uses ``.grad``,
  except on the last step of a hyper period.
* ``hyper_step`` re-runs the last training closure once at :math:`w_{T-1}` (same RNG state)
  to rebuild the graph of the update it differentiates, and calls its own closure only when
  a hyper-step is due (so a validation batch drawn inside it is drawn only then). A model
  whose forward has side effects (BatchNorm running statistics in train mode) sees that
  closure twice.
* ``state_dict()`` / ``load_state_dict()`` hold the step count, momentum buffers, the
  stored hyperparameters and the hyper-optimiser's state: a resumed run continues bit for
  bit. :meth:`hyperparameters` gives the learned values for logging.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import ConfigError, NeumannDivergenceError, NonFiniteError
from bilevel.hypergrad import linear_solve
from bilevel.hypergrad.kit import write_grad
from bilevel.optim import SGDState, sgd
from bilevel.optim.hyperparameters import HParamSpec, Hyperparameters
from bilevel.tree import tree_all_finite, tree_flatten, tree_unflatten

NAMES = ("lr", "weight_decay", "momentum")
_ALIASES = {"wd": "weight_decay", "mom": "momentum"}
_TRANSFORMS = {"lr": "log10", "weight_decay": "log10", "momentum": "sigmoid"}
_STEP0 = torch.zeros((), dtype=torch.int64)  # dampening is 0, so the step count is unused
Closure = Callable[[], Tensor]


class HyperSGD(torch.optim.Optimizer):
    """SGD (momentum, coupled weight decay) that learns ``learn`` online (module docstring).

    Args:
        params: ``model.parameters()`` or ``model.named_parameters()`` (one group).
        lr, weight_decay, momentum: initial values (``lr > 0``; a learned weight decay must
            start ``> 0``, a learned momentum in ``(0, 1)``).
        learn: which of ``"lr"``, ``"weight_decay"`` (``"wd"``), ``"momentum"`` to learn.
        granularity: ``"scalar"``, ``"tensor"`` or ``"element"`` for every learned one, or
            a dict by name (e.g. ``{"lr": "element"}``: Clarke et al.'s HDLR).
        method: ``"one_pass"`` (``terms`` Neumann terms, default 5) or ``"greedy"`` (1).
        hyper_every: weight steps per hyper-step (T).
        hyper_lr: learning rate of the hyper-optimiser.
        hyper_optimizer: ``"adam"``, ``"sgd"`` or a callable ``params -> Optimizer``.
        lr_bounds: the learned learning rate is clipped to ``[low, high]`` (in log10);
            ``None`` leaves that side open.
        grad_clip: scale the weight gradient to at most this norm (``None``: off).
        on_divergence: ``"identity"`` (fall back to one term) or ``"raise"`` when the
            Neumann series grows.
        on_nonfinite: ``"skip"`` the hyper-update (counted in ``skipped``) or ``"raise"``.
    """

    def __init__(
        self, params: Iterable[Any], *, lr: float, weight_decay: float = 0.0,
        momentum: float = 0.0, learn: Iterable[str] = ("lr",),
        granularity: str | Mapping[str, str] = "scalar", method: str = "one_pass",
        terms: int | None = None, hyper_every: int = 10, hyper_lr: float = 0.05,
        hyper_optimizer: str | Callable[[list[Tensor]], torch.optim.Optimizer] = "adam",
        lr_bounds: tuple[float | None, float | None] = (1e-10, 1.0), grad_clip: float | None = None,
        on_divergence: str = "identity", on_nonfinite: str = "skip",
    ) -> None:
        names, tensors = _named(params)
        learned = tuple(_ALIASES.get(n, n) for n in learn)
        _check(learned, method, terms, hyper_every, on_divergence, on_nonfinite, lr_bounds)
        super().__init__(tensors, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.names, self.learn, self.method = names, learned, method
        self.terms = terms if terms is not None else (1 if method == "greedy" else 5)
        self.hyper_every, self.grad_clip = hyper_every, grad_clip
        self.on_divergence, self.on_nonfinite = on_divergence, on_nonfinite
        like = dict(zip(names, tensors, strict=True))
        init = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        gran = granularity if isinstance(granularity, Mapping) else dict.fromkeys(learned, granularity)
        bounds = {"lr": {"low": None if lr_bounds[0] is None else math.log10(lr_bounds[0]),
                         "high": None if lr_bounds[1] is None else math.log10(lr_bounds[1])}}
        # A constant 0 (no momentum, no weight decay) stays a python 0: the rule skips it.
        self.constants = {n: 0.0 for n in NAMES if n not in learned and init[n] == 0}
        specs = {n: HParamSpec(init=init[n], transform=_TRANSFORMS[n], learn=n in learned,
                               granularity=gran.get(n, "scalar") if n in learned else "scalar",
                               **bounds.get(n, {}))
                 for n in NAMES if n not in self.constants}
        self.hp = Hyperparameters(specs, like=like, dtype=tensors[0].dtype).to(tensors[0].device)
        self.hyper_opt = _hyper_optimizer(hyper_optimizer, self.hp.learned(), hyper_lr)
        self.buf = {n: torch.zeros_like(p) for n, p in like.items()}
        self.t, self.skipped = 0, 0
        self.last_info: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None
        self._sync_groups()

    # -- the weight step ----------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return list(self.param_groups[0]["params"])

    def _values(self, raw: Any = None) -> dict[str, Any]:
        return {**self.hp.values(raw), **self.constants}

    def _update(self, w: dict[str, Tensor], grads: dict[str, Tensor], hv: dict[str, Any],
                buf: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return sgd_update(w, grads, buf, hv, grad_clip=self.grad_clip)

    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One weight update; returns the closure's loss (detached), or ``None`` without one."""
        if self._pending is not None:
            raise RuntimeError("HyperSGD: a hyper-step is due; call hyper_step(val_closure) after "
                               "the step that completes each hyper_every period")
        params = self._params()
        due = bool(self.learn) and (self.t + 1) % self.hyper_every == 0
        rng = _rng_state(params) if due else None
        if closure is None:
            if due:
                raise RuntimeError("HyperSGD: the last step of each hyper period needs "
                                   "step(closure), to differentiate the update")
            loss, grads = None, [_grad_of(p, i) for i, p in enumerate(params)]
        else:
            with torch.enable_grad():
                loss = closure()
                grads = list(torch.autograd.grad(loss, params, allow_unused=True))
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        w = dict(zip(self.names, params, strict=True))
        with torch.no_grad():
            new_w, new_buf = self._update(w, dict(zip(self.names, grads, strict=True)),
                                          self._values(), self.buf)
            if due:
                self._pending = {"w_prev": [p.detach().clone() for p in params],
                                 "w_new": list(new_w.values()), "buf_prev": self.buf,
                                 "closure": closure, "rng": rng}
            for p, v in zip(params, new_w.values(), strict=True):
                p.copy_(v)
        self.buf, self.t = new_buf, self.t + 1
        return None if loss is None else loss.detach()

    # -- the hyper-step -----------------------------------------------------------------------
    def hyper_step(self, closure: Closure) -> Tensor | None:
        """If a hyper-step is due: the hypergradient of ``closure()`` (a validation loss at
        the current weights), one hyper-optimiser step and the lr clip; returns the loss.
        Otherwise does nothing (``closure`` is not called) and returns ``None``."""
        if self._pending is None:
            return None
        hg, val = self.hypergradient(closure)
        if not bool(tree_all_finite(hg)):
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"HyperSGD: non-finite hypergradient at step {self.t} (on_nonfinite='skip' skips such hyper-steps)", step=self.t, what="hypergradient")
            self.skipped += 1
            self.last_info["skipped"] = True
            return val
        write_grad(hg, self.hp.raw_tree())
        self.hyper_opt.step()
        self.hp.clip_()
        self._sync_groups()
        return val

    def hypergradient(self, closure: Closure) -> tuple[Any, Tensor]:
        """The due hypergradient (a tree like ``hp.raw_tree()``) and the validation loss,
        without moving the hyperparameters; clears the due hyper-step."""
        if self._pending is None:
            raise RuntimeError("HyperSGD: no hyper-step is due (see hyper_every)")
        pend, self._pending = self._pending, None
        params = self._params()
        with torch.enable_grad():
            val = closure()
            v = torch.autograd.grad(val, params, allow_unused=True)
        v = [torch.zeros_like(p) if g is None else g for g, p in zip(v, params, strict=True)]
        with torch.no_grad():
            for p, w in zip(params, pend["w_prev"], strict=True):
                p.copy_(w)
        try:
            hg, info = self._one_pass(params, pend, v)
        finally:
            with torch.no_grad():
                for p, w in zip(params, pend["w_new"], strict=True):
                    p.copy_(w)
        self.last_info = info | {"val_loss": float(val.detach()), "skipped": False}
        return hg, val.detach()

    def _one_pass(self, params: list[Tensor], pend: dict[str, Any], v: list[Tensor]
                  ) -> tuple[Any, dict[str, Any]]:
        raw = self.hp.raw_tree()
        h_leaves, h_def = tree_flatten(raw)
        with torch.random.fork_rng(devices=pend["rng"][2]), torch.enable_grad():
            _set_rng(pend["rng"])  # the same dropout masks as the update being redone
            loss = pend["closure"]()
            g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            g = [torch.zeros_like(p) if x is None else x for x, p in zip(g, params, strict=True)]
            new, _ = self._update(dict(zip(self.names, params, strict=True)),
                                  dict(zip(self.names, g, strict=True)), self._values(raw),
                                  pend["buf_prev"])
            outs = list(new.values())

            def jt(vec: list[Tensor]) -> list[Tensor]:  # (∂Φ/∂w)ᵀ vec
                out = torch.autograd.grad(outs, params, vec, retain_graph=True, allow_unused=True)
                return [torch.zeros_like(p) if o is None else o for o, p in zip(out, params, strict=True)]

            try:
                x, info = linear_solve.neumann(jt, v, iters=self.terms - 1)
            except NeumannDivergenceError:
                if self.on_divergence == "raise":
                    raise
                x, info = [1.0 * t for t in v], {"fallback": "identity"}
            indirect = torch.autograd.grad(outs, h_leaves, x, allow_unused=True)
        hg = [torch.zeros_like(h) + (0 if i is None else i) for h, i in zip(h_leaves, indirect, strict=True)]
        return tree_unflatten(h_def, [x.detach() for x in hg]), info

    # -- reading and saving -------------------------------------------------------------------
    def hyperparameters(self) -> dict[str, float]:
        """The current values for logging: ``lr``, ``weight_decay``, ``momentum`` (scalars),
        or mean and 5/50/95 % quantiles for per-tensor / per-element ones."""
        return {**self.hp.summary(), **self.constants}

    def values(self) -> dict[str, Any]:
        """The current values in the forms :func:`bilevel.optim.sgd.step` takes (detached)."""
        return self._values()

    def _sync_groups(self) -> None:
        group = self.param_groups[0]
        for name, value in self.hyperparameters().items():
            if name in NAMES:
                group[name] = value

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Step count, momentum buffers, stored hyperparameters, hyper-optimiser state."""
        if self._pending is not None:
            raise RuntimeError("HyperSGD.state_dict: a hyper-step is due; call hyper_step first")
        return {"t": self.t, "skipped": self.skipped,
                "momentum_buffer": {k: v.clone() for k, v in self.buf.items()},
                "hparams": {k: v.clone() for k, v in self.hp.state_dict().items()},
                "hyper_optimizer": self.hyper_opt.state_dict() if self.hyper_opt else None,
                "settings": self._settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict` into an optimiser built with the same settings."""
        state = copy.deepcopy(dict(state))  # torch.optim would share Adam's step tensors
        if state.get("settings") != self._settings():
            raise ConfigError(f"HyperSGD.load_state_dict: saved with settings {state.get('settings')}, "
                              f"this optimiser has {self._settings()}; build it with the same ones")
        self.t, self.skipped = int(state["t"]), int(state["skipped"])
        self.buf = {k: state["momentum_buffer"][k] for k in self.names}
        self.hp.load_state_dict(state["hparams"])
        if self.hyper_opt is not None:
            self.hyper_opt.load_state_dict(state["hyper_optimizer"])
        self._pending = None
        self._sync_groups()

    def _settings(self) -> dict[str, Any]:
        return {"names": list(self.names), "learn": list(self.learn), "method": self.method,
                "terms": self.terms, "hyper_every": self.hyper_every}

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={v:.4g}" for k, v in self.hyperparameters().items())
        return f"HyperSGD({values}, learn={self.learn}, method={self.method!r}, step={self.t})"


def sgd_update(w: dict[str, Tensor], grads: dict[str, Tensor], buf: dict[str, Tensor],
               hv: Mapping[str, Any], *, grad_clip: float | None = None
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Clarke et al.'s weight update (module docstring): ``(w, b) -> (w', b')``, pure and
    differentiable in every input; ``hv`` holds ``lr``, ``weight_decay``, ``momentum``."""
    if grad_clip is not None:
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        scale = torch.clamp(grad_clip / (norm + 1e-6), max=1.0)
        grads = {k: g * scale for k, g in grads.items()}
    new_w, st = sgd.step(w, grads, SGDState(buf, _STEP0), lr=hv["lr"],
                         momentum=hv["momentum"], weight_decay=hv["weight_decay"])
    return new_w, st.momentum_buffer


def _named(params: Iterable[Any]) -> tuple[list[str], list[Tensor]]:
    items = list(params)
    if not items:
        raise ValueError("HyperSGD got an empty parameter list (an exhausted generator?)")
    if any(isinstance(x, Mapping) for x in items):
        raise TypeError("HyperSGD takes one parameter group: pass model.parameters() or "
                        "model.named_parameters(), not a list of group dicts")
    if all(isinstance(x, tuple) and len(x) == 2 for x in items):
        return [str(n) for n, _ in items], [p for _, p in items]
    return [str(i) for i in range(len(items))], items


def _check(learn: tuple[str, ...], method: str, terms: int | None, hyper_every: int,
           on_divergence: str, on_nonfinite: str, lr_bounds: tuple[float | None, float | None]) -> None:
    unknown = [n for n in learn if n not in NAMES]
    if unknown:
        raise ConfigError(f"HyperSGD(learn=...): unknown {unknown}; choose from {list(NAMES)}")
    if method not in ("one_pass", "greedy"):
        raise ConfigError(f"HyperSGD(method={method!r}): use 'one_pass' or 'greedy'")
    if terms is not None and (terms < 1 or (method == "greedy" and terms != 1)):
        raise ConfigError(f"HyperSGD(terms={terms}): >= 1 for one_pass; greedy is terms=1")
    if hyper_every < 1:
        raise ConfigError(f"HyperSGD(hyper_every={hyper_every}): must be >= 1 (weight steps)")
    if on_divergence not in ("identity", "raise") or on_nonfinite not in ("skip", "raise"):
        raise ConfigError("HyperSGD: on_divergence is 'identity' or 'raise'; on_nonfinite is "
                          "'skip' or 'raise'")
    low, high = lr_bounds
    if (low is not None and not low > 0) or (high is not None and not (low or 0) < high):
        raise ConfigError(f"HyperSGD(lr_bounds={lr_bounds}): need 0 < low < high (None: no bound)")


def _hyper_optimizer(kind: Any, params: list[Tensor], lr: float) -> torch.optim.Optimizer | None:
    if not params:
        return None
    if callable(kind):
        return kind(params)
    if kind not in ("adam", "sgd"):
        raise ConfigError(f"HyperSGD(hyper_optimizer={kind!r}): 'adam', 'sgd' or a callable")
    return (torch.optim.Adam if kind == "adam" else torch.optim.SGD)(params, lr=lr)


def _grad_of(p: Tensor, i: int) -> Tensor:
    if p.grad is None:
        raise RuntimeError(f"HyperSGD.step(): parameter #{i} has no .grad; call loss.backward() "
                           "first or pass a closure that returns the loss")
    return p.grad


def _rng_state(params: list[Tensor]) -> tuple[Tensor, list[Tensor], list[int]]:
    devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices], devices


def _set_rng(state: tuple[Tensor, list[Tensor], list[int]]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(state[2], state[1], strict=True):
        torch.cuda.set_rng_state(s, d)
