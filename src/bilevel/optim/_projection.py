"""Projection onto an L2 ball: AliG's regulariser (a constraint instead of weight decay).

:func:`project_l2_ball` is the pure, differentiable form; :func:`l2_projection` is the
in-place callable that :class:`~bilevel.optim.AliG` takes as ``projection_fn``. Both scale
all parameters *jointly* by :math:`\\min(1, r / \\lVert w \\rVert)`, where
:math:`\\lVert w \\rVert` is the norm over every parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from bilevel.errors import ConfigError
from bilevel.optim._hparams import Params, Scalar, safe_sqrt


def _check_radius(max_norm: Scalar | None) -> None:
    if max_norm is not None and not isinstance(max_norm, Tensor) and not float(max_norm) > 0:
        raise ConfigError(
            f"max_norm must be > 0 (or None for no projection), got {max_norm}."
        )


def project_l2_ball(params: Params, *, max_norm: Scalar | None) -> Params:
    """``params`` scaled jointly into the ball of radius ``max_norm`` (None: unchanged).

    Differentiable, including at the origin; never modifies its input.
    """
    _check_radius(max_norm)
    if max_norm is None or not params:
        return dict(params)
    norm = safe_sqrt(torch.stack([(p * p).sum() for p in params.values()]).sum())  # ()
    if isinstance(max_norm, Tensor):
        scale = max_norm / torch.maximum(norm, max_norm)
    else:
        scale = max_norm / torch.clamp(norm, min=max_norm)
    return {name: p * scale for name, p in params.items()}


def l2_projection(
    params: Iterable[Tensor] | Mapping[str, Tensor], max_norm: float | None
) -> Callable[[], None]:
    """A no-argument callable that projects ``params`` in place onto the L2 ball.

    Use it as ``AliG(..., projection_fn=l2_projection(model.parameters(), max_norm=100))``.
    The parameters are rescaled jointly when their global norm exceeds ``max_norm``;
    ``max_norm=None`` gives a no-op. The scale is computed on the device, so calling it
    never synchronises.
    """
    _check_radius(max_norm)
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    if max_norm is None:
        return lambda: None

    @torch.no_grad()
    def project() -> None:
        named = {str(i): p for i, p in enumerate(tensors)}
        for p, new in zip(tensors, project_l2_ball(named, max_norm=max_norm).values(),
                          strict=True):
            p.copy_(new)

    return project
