r"""Learned optimiser hyperparameters, stored unconstrained and mapped through named transforms.

A hyperparameter ``h`` (learning rate, weight decay, momentum, ...) is stored as a raw tensor
``r`` that gradient descent may move anywhere; the value the optimiser uses is
``h = T(r)`` for a named transform ``T``:

=============  ========================  ===========================  ====================
name           value  ``T(r)``           stored ``T^{-1}(h)``          natural range
=============  ========================  ===========================  ====================
``log10``      :math:`10^{r}`            :math:`\log_{10} h`           :math:`h > 0`
``sigmoid``    :math:`1/(1+e^{-r})`      :math:`\log(h/(1-h))`          :math:`0 < h < 1`
``softplus``   :math:`\log(1+e^{r})`     :math:`\log(e^{h}-1)`          :math:`h > 0`
``identity``   :math:`r`                 :math:`h`                     any
=============  ========================  ===========================  ====================

Granularity: ``scalar`` (one value), ``tensor`` (one value per parameter tensor) or
``element`` (one value per weight, "HDLR" in Clarke et al.), each initialised to the same
value. ``low``/``high`` clip the *stored* value after every outer step (:meth:`clip_`), e.g.
``log10`` lr in ``[-10, 0]`` is Clarke et al.'s ``lr ∈ [1e-10, 1]``.

The values come out in the forms :mod:`bilevel.optim` accepts: a 0-d tensor, or a dict
``{parameter name: tensor}`` for per-tensor/per-element hyperparameters. For hypergradients,
pass :meth:`Hyperparameters.raw_tree` (the learned raw leaves, which require grad) as
``hparams`` and map it inside the step with :meth:`Hyperparameters.values`.

Example:
    >>> import torch
    >>> from bilevel.optim.hyperparameters import HParamSpec, Hyperparameters
    >>> hp = Hyperparameters({"lr": HParamSpec(init=1e-3, transform="log10", low=-10, high=0),
    ...                       "momentum": HParamSpec(init=0.9, transform="sigmoid", learn=False)})
    >>> raw = hp.raw_tree()               # {'lr': tensor(-3., requires_grad=True)}
    >>> v = hp.values(raw)                # {'lr': 10**raw['lr'], 'momentum': tensor(0.9000)}
    >>> round(float(v["lr"].detach()), 6), round(float(v["momentum"]), 4)
    (0.001, 0.9)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from bilevel.errors import ConfigError

HValue = Tensor | dict[str, Tensor]  # a 0-d tensor, or one tensor per parameter name
RawTree = dict[str, HValue]


class Transform(NamedTuple):
    """``forward`` maps a raw tensor to a value; ``inverse`` maps a python value back."""

    forward: Callable[[Tensor], Tensor]
    inverse: Callable[[float], float]
    valid: Callable[[float], bool]
    domain: str


def _logit(h: float) -> float:
    return math.log(h / (1.0 - h))


TRANSFORMS: dict[str, Transform] = {
    "log10": Transform(lambda r: 10.0 ** r, math.log10, lambda h: h > 0, "> 0"),
    "sigmoid": Transform(torch.sigmoid, _logit, lambda h: 0 < h < 1, "in (0, 1)"),
    "softplus": Transform(nn.functional.softplus, lambda h: h + math.log(-math.expm1(-h)),
                          lambda h: h > 0, "> 0"),
    "identity": Transform(lambda r: r, float, math.isfinite, "finite"),
}
Granularity = Literal["scalar", "tensor", "element"]


@dataclass(frozen=True)
class HParamSpec:
    """How one hyperparameter is stored and bounded.

    Args:
        init: the initial *value* (e.g. ``1e-3``), in the transform's natural range.
        transform: a name in :data:`TRANSFORMS`.
        granularity: ``scalar``, ``tensor`` (per parameter tensor) or ``element`` (per weight).
        low, high: clip of the stored raw value (``None``: unbounded).
        learn: whether it is a leaf of :meth:`Hyperparameters.raw_tree` (else a constant).
    """

    init: float
    transform: str = "identity"
    granularity: Granularity = "scalar"
    low: float | None = None
    high: float | None = None
    learn: bool = True

    def raw_init(self, name: str) -> float:
        """``T^{-1}(init)``, with an error naming the hyperparameter if out of range."""
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"hyperparameter {name!r}: unknown transform {self.transform!r}; "
                              f"use one of {sorted(TRANSFORMS)}")
        t = TRANSFORMS[self.transform]
        if not t.valid(self.init):
            raise ConfigError(f"hyperparameter {name!r} = {self.init} is outside the range of "
                              f"transform {self.transform!r} (values {t.domain}); change its "
                              "initial value or the transform")
        return t.inverse(self.init)


def _key(param_name: str) -> str:
    return param_name.replace(".", "/")  # module attribute names may not contain dots


class Hyperparameters(nn.Module):
    """A set of named hyperparameters stored unconstrained (see the module docstring).

    Args:
        specs: ``{name: HParamSpec}``.
        like: the model's parameters by name; needed for ``tensor``/``element`` granularity
            (their dtype and device are used).
        dtype: dtype of scalar hyperparameters (default: torch's default dtype).

    ``state_dict()``/``load_state_dict()`` hold the raw values, so a checkpoint restores them.
    """

    def __init__(self, specs: Mapping[str, HParamSpec], *,
                 like: Mapping[str, Tensor] | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        self.specs = dict(specs)
        self.raw = nn.ParameterDict()
        for name, spec in self.specs.items():
            r0 = spec.raw_init(name)
            if spec.granularity == "scalar":
                self.raw[name] = nn.Parameter(torch.tensor(r0, dtype=dtype), requires_grad=spec.learn)
                continue
            if like is None:
                raise ConfigError(f"hyperparameter {name!r} has granularity "
                                  f"{spec.granularity!r}: pass like=<model parameters>")
            self.raw[name] = nn.ParameterDict({
                _key(k): nn.Parameter(torch.full(() if spec.granularity == "tensor" else p.shape,
                                                 r0, dtype=p.dtype, device=p.device),
                                      requires_grad=spec.learn)
                for k, p in like.items()})
        self._names = {name: list(like) if like is not None else [] for name in self.specs}

    def _raw(self, name: str) -> HValue:
        r = self.raw[name]
        if isinstance(r, nn.ParameterDict):
            return {k: r[_key(k)] for k in self._names[name]}
        return r

    def raw_tree(self) -> RawTree:
        """The learned raw leaves ``{name: tensor or {param: tensor}}`` (they require grad)."""
        return {n: self._raw(n) for n, s in self.specs.items() if s.learn}

    def learned(self) -> list[nn.Parameter]:
        """The learned raw tensors, for an outer optimiser."""
        return [p for p in self.parameters() if p.requires_grad]

    def values(self, raw: Mapping[str, HValue] | None = None) -> dict[str, HValue]:
        """Every hyperparameter's value ``T(raw)``; ``raw`` replaces the learned leaves.

        Differentiable in ``raw``; hyperparameters absent from ``raw`` use their stored
        values, detached.
        """
        out: dict[str, HValue] = {}
        for name, spec in self.specs.items():
            fwd = TRANSFORMS[spec.transform].forward
            r = raw[name] if raw is not None and name in raw else _detach(self._raw(name))
            out[name] = {k: fwd(v) for k, v in r.items()} if isinstance(r, dict) else fwd(r)
        return out

    @torch.no_grad()
    def clip_(self) -> None:
        """Clamp every stored value to its spec's ``[low, high]`` (call after outer steps)."""
        for name, spec in self.specs.items():
            if spec.low is None and spec.high is None:
                continue
            r = self._raw(name)
            for t in r.values() if isinstance(r, dict) else [r]:
                t.clamp_(spec.low, spec.high)

    @torch.no_grad()
    def shift_(self, name: str, delta: float) -> None:
        """Add ``delta`` to the stored value of ``name`` (e.g. ``log10(m)`` multiplies a
        ``log10`` hyperparameter by ``m``), then clip."""
        r = self._raw(name)
        for t in r.values() if isinstance(r, dict) else [r]:
            t.add_(delta)
        self.clip_()

    def summary(self) -> dict[str, float]:
        """Scalars for logging: the value, or mean and 5/50/95% quantiles over elements."""
        out: dict[str, float] = {}
        for name, v in self.values().items():
            if not isinstance(v, dict):
                out[name] = float(v)
                continue
            flat = torch.cat([t.detach().reshape(-1).float() for t in v.values()])
            q = torch.quantile(flat[:1_000_000], torch.tensor([0.05, 0.5, 0.95], device=flat.device))
            out |= {f"{name}_mean": float(flat.mean()), f"{name}_q05": float(q[0]),
                    f"{name}_q50": float(q[1]), f"{name}_q95": float(q[2])}
        return out


def _detach(r: HValue) -> HValue:
    return {k: v.detach() for k, v in r.items()} if isinstance(r, dict) else r.detach()
