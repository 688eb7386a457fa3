"""Auxiliary-loss combiners (AuxiLearn): learned maps from per-task losses to one training loss.

Input is a per-example loss matrix ``losses[b, j]`` (``[B, T]``: example ``b``, task ``j``)
or, for :class:`ConvCombiner`, a per-pixel loss image ``[B, T, H, W]``. Output is the scalar
training loss ``L_T``. The combiner's parameters ``φ`` are meta-parameters: train them with
:class:`bilevel.hypergrad.MetaOptimizer` on a main-task validation loss.

=========================  ====================================================================
:class:`LinearCombiner`     ``mean_b Σ_j w_j ℓ_bj`` (+ ``mean_b ℓ_b,main`` with ``skip_connection``)
:class:`NonlinearCombiner`  ``mean_b f(ℓ_b) + mean_b ℓ_b,main``; ``f`` an MLP (softplus), last
                            layer without bias
:class:`ConvCombiner`       ``mean_b mean_hw CNN(ℓ_b) + mean_b mean_hw ℓ_b,main`` on loss images
=========================  ====================================================================

``monotone=True`` makes the output non-decreasing in every loss (a task can be down-weighted
to zero but never rewarded for a higher loss): weights start non-negative and
:meth:`clamp` must be called after every meta-step to project them back to ``≥ 0``. With
weight normalisation (``w = g v/‖v‖``, the seed's default) both ``g`` and ``v`` are clamped.
:func:`task_weights` reads off the effective weight of each task, ``Σ_b ∂L_T/∂ℓ_bj``.

Example:
    >>> import torch
    >>> comb = LinearCombiner(3, monotone=True)
    >>> comb(torch.rand(8, 3)).shape
    torch.Size([])
    >>> task_weights(comb, torch.rand(8, 3))
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm


def _layer(layer: nn.Module, *, init: tuple[float, float] | None, norm: bool) -> nn.Module:
    if init is not None:
        nn.init.uniform_(layer.weight, *init)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return _weight_norm(layer) if norm else layer


def _clamp_nonneg(layers: Sequence[nn.Module]) -> None:
    """Project the weights of ``layers`` (weight-normalised or not) onto ``≥ 0``, in place."""
    with torch.no_grad():
        for layer in layers:
            if not hasattr(layer, "parametrizations"):
                layer.weight.clamp_(min=0)
                continue
            g = layer.parametrizations.weight.original0  # [out, 1, ...]
            v = layer.parametrizations.weight.original1  # [out, in, ...]
            g.clamp_(min=0)
            v.clamp_(min=0)
            # A row of v clamped to zero has no direction (0/0 = NaN weights): give it one,
            # with zero length, so the weight is 0 and g can still grow it back.
            dead = v.flatten(1).sum(1) == 0  # [out]
            v[dead] = 1.0
            g[dead] = 0.0


def _check(num_tasks: int, main_task: int | None) -> None:
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if main_task is not None and not 0 <= main_task < num_tasks:
        raise ValueError(f"main_task must index a task in [0, {num_tasks}), got {main_task}")


def _check_losses(losses: torch.Tensor, num_tasks: int, ndim: int) -> None:
    if losses.ndim != ndim or losses.shape[1] != num_tasks:
        want = "[B, T]" if ndim == 2 else "[B, T, H, W]"
        raise ValueError(f"losses must be {want} with T={num_tasks} tasks, got shape "
                         f"{tuple(losses.shape)}")


class LinearCombiner(nn.Module):
    """``L_T = mean_b Σ_j w_j ℓ_bj`` (+ ``mean_b ℓ_b,main`` when ``skip_connection``).

    Args:
        num_tasks: ``T``, columns of the loss matrix (main task included).
        main_task: column of the main task (used by the skip connection).
        skip_connection: add the unweighted main loss, so the main task keeps weight ≥ 1.
        init_value: initial ``w_j`` (1: equal weighting).
        weight_norm: parametrise ``w = g v/‖v‖`` (the seed's default).
        monotone: keep ``w ≥ 0`` (call :meth:`clamp` after each meta-step).
    """

    def __init__(self, num_tasks: int, *, main_task: int = 0, skip_connection: bool = False,
                 init_value: float = 1.0, weight_norm: bool = True, monotone: bool = False
                 ) -> None:
        super().__init__()
        _check(num_tasks, main_task)
        if monotone and init_value < 0:
            raise ValueError(f"a monotone combiner needs init_value >= 0, got {init_value}")
        self.num_tasks, self.main_task = num_tasks, main_task
        self.skip_connection, self.monotone = skip_connection, monotone
        self.linear = _layer(nn.Linear(num_tasks, 1, bias=False),
                             init=(init_value, init_value), norm=weight_norm)

    @property
    def weights(self) -> torch.Tensor:
        """The effective ``w`` (``[T]``, detached), skip connection not included."""
        return self.linear.weight.detach().reshape(-1)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        _check_losses(losses, self.num_tasks, 2)
        loss = self.linear(losses).mean()  # [B, 1] -> scalar
        if self.skip_connection:
            loss = loss + losses[:, self.main_task].mean()
        return loss

    def clamp(self) -> None:
        """Project the weights onto ``≥ 0`` if ``monotone`` (no-op otherwise)."""
        if self.monotone:
            _clamp_nonneg([self.linear])


class NonlinearCombiner(nn.Module):
    """``L_T = mean_b f(ℓ_b) + mean_b ℓ_b,main`` with ``f`` an MLP ``T → hidden… → 1``.

    Hidden layers are ``Linear → activation → Dropout``; the last layer has no bias. Weights
    start uniform in ``init_range`` and biases at zero.

    Args:
        num_tasks: ``T``.
        hidden_sizes: widths of the hidden layers (AuxiLearn's NYUv2: ``(3,)``).
        main_task: column of the main task.
        skip_connection: add ``mean_b ℓ_b,main`` (the seed always does).
        activation: factory of the nonlinearity (softplus: smooth and increasing, so a
            monotone net stays monotone).
        dropout: dropout rate after each hidden activation.
        init_range: ``(low, high)`` of the uniform weight initialisation.
        weight_norm: weight-normalise every layer.
        monotone: keep all weights ``≥ 0`` (with an increasing activation, ``f`` is then
            non-decreasing in every loss); call :meth:`clamp` after each meta-step.
    """

    def __init__(self, num_tasks: int, *, hidden_sizes: Sequence[int] = (3,),
                 main_task: int = 0, skip_connection: bool = True,
                 activation: Callable[[], nn.Module] = nn.Softplus, dropout: float = 0.0,
                 init_range: tuple[float, float] = (0.0, 1.0), bias: bool = True,
                 weight_norm: bool = True, monotone: bool = False) -> None:
        super().__init__()
        _check(num_tasks, main_task)
        if not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be positive widths, got {list(hidden_sizes)}")
        if monotone and init_range[0] < 0:
            raise ValueError(f"a monotone combiner needs init_range >= 0, got {init_range}")
        self.num_tasks, self.main_task = num_tasks, main_task
        self.skip_connection, self.monotone = skip_connection, monotone
        dims = [num_tasks, *hidden_sizes]
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [_layer(nn.Linear(d_in, d_out, bias=bias), init=init_range, norm=weight_norm),
                       activation(), nn.Dropout(dropout)]
        layers.append(_layer(nn.Linear(dims[-1], 1, bias=False), init=init_range, norm=weight_norm))
        self.net = nn.Sequential(*layers)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        _check_losses(losses, self.num_tasks, 2)
        loss = self.net(losses).mean()  # [B, 1] -> scalar
        if self.skip_connection:
            loss = loss + losses[:, self.main_task].mean()
        return loss

    def clamp(self) -> None:
        """Project every weight onto ``≥ 0`` if ``monotone`` (biases are left free)."""
        if self.monotone:
            _clamp_nonneg([m for m in self.net if isinstance(m, nn.Linear)])


class ConvCombiner(nn.Module):
    """Per-pixel combiner: ``mean_b mean_hw CNN(ℓ_b) + mean_b red_hw ℓ_b,main`` on ``[B, T, H, W]``.

    The CNN is ``(Conv3x3 → softplus → AvgPool2)`` per entry of ``channels``, then a 1×1
    convolution to one channel without bias. AuxiLearn uses ``channels=(8, 16, 32)`` and,
    for its monotone variant, ``(8, 16)``.

    Args:
        num_tasks: ``T`` (input channels).
        main_task: channel of the main task (``None``: no skip term).
        channels: widths of the conv blocks.
        reduction: ``"mean"`` or ``"sum"`` over pixels of the main-task skip term.
        init_range: uniform initialisation of the conv weights.
        weight_norm: weight-normalise every convolution.
        monotone: keep conv weights ``≥ 0``; call :meth:`clamp` after each meta-step.
    """

    def __init__(self, num_tasks: int, *, main_task: int | None = 0,
                 channels: Sequence[int] = (8, 16, 32), reduction: str = "mean",
                 init_range: tuple[float, float] = (0.0, 0.1), weight_norm: bool = True,
                 monotone: bool = False) -> None:
        super().__init__()
        _check(num_tasks, main_task)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if monotone and init_range[0] < 0:
            raise ValueError(f"a monotone combiner needs init_range >= 0, got {init_range}")
        self.num_tasks, self.main_task = num_tasks, main_task
        self.reduction, self.monotone = reduction, monotone
        dims = [num_tasks, *channels]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(dims):
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
            layers += [_layer(conv, init=init_range, norm=weight_norm), nn.Softplus(),
                       nn.AvgPool2d(kernel_size=2)]
        head = nn.Conv2d(dims[-1], 1, kernel_size=1, bias=False)
        layers.append(_layer(head, init=init_range if monotone else None, norm=weight_norm))
        self.conv = nn.Sequential(*layers)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        _check_losses(losses, self.num_tasks, 4)
        loss = self.conv(losses).mean()  # [B, 1, H', W'] -> scalar
        if self.main_task is not None:
            main = losses[:, self.main_task]  # [B, H, W]
            per_image = main.mean((1, 2)) if self.reduction == "mean" else main.sum((1, 2))
            loss = loss + per_image.mean()
        return loss

    def clamp(self) -> None:
        """Project every conv weight onto ``≥ 0`` if ``monotone`` (biases are left free)."""
        if self.monotone:
            _clamp_nonneg([m for m in self.conv if isinstance(m, nn.Conv2d)])


Combiner = LinearCombiner | NonlinearCombiner | ConvCombiner


def task_weights(combiner: nn.Module, losses: torch.Tensor) -> torch.Tensor:
    """Effective weight of each task at ``losses``: ``Σ_{b, pixels} ∂L_T/∂ℓ`` per task, ``[T]``.

    For :class:`LinearCombiner` this is ``w`` (plus 1 on the main task with the skip
    connection); for the nonlinear ones it is the local slope, averaged over the batch.
    """
    x = losses.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(combiner(x), x)
    return g.transpose(0, 1).reshape(x.shape[1], -1).sum(1)


# --- the seed's class names (auxilearn.hypernet), for migration; ``input_dim`` = ``T``. ------

def LinearHyperNet(main_task: int, input_dim: int, skip_connection: bool = False,
                   init_value: float = 1.0, weight_normalization: bool = True) -> LinearCombiner:
    """``auxilearn.hypernet.LinearHyperNet`` as a :class:`LinearCombiner`."""
    return LinearCombiner(input_dim, main_task=main_task, skip_connection=skip_connection,
                          init_value=init_value, weight_norm=weight_normalization)


def MonoLinearHyperNet(main_task: int, input_dim: int, skip_connection: bool = False,
                       init_value: float = 1.0, weight_normalization: bool = True
                       ) -> LinearCombiner:
    """``auxilearn.hypernet.MonoLinearHyperNet``: a monotone :class:`LinearCombiner`."""
    return LinearCombiner(input_dim, main_task=main_task, skip_connection=skip_connection,
                          init_value=init_value, weight_norm=weight_normalization, monotone=True)


def NonlinearHyperNet(main_task: int, input_dim: int, hidden_sizes: int | Sequence[int] = 1,
                      dropout_rate: float = 0.0, init_lower: float = 0.0, init_upper: float = 1.0,
                      weight_normalization: bool = True, *, monotone: bool = False
                      ) -> NonlinearCombiner:
    """``auxilearn.hypernet.NonlinearHyperNet`` as a :class:`NonlinearCombiner` (softplus)."""
    sizes = [hidden_sizes] if isinstance(hidden_sizes, int) else list(hidden_sizes)
    return NonlinearCombiner(input_dim, hidden_sizes=sizes, main_task=main_task,
                             dropout=dropout_rate, init_range=(init_lower, init_upper),
                             weight_norm=weight_normalization, monotone=monotone)


def MonoNonlinearHyperNet(main_task: int, input_dim: int,
                          hidden_sizes: int | Sequence[int] = 1, dropout_rate: float = 0.0,
                          init_lower: float = 0.0, init_upper: float = 1.0,
                          weight_normalization: bool = True) -> NonlinearCombiner:
    """``auxilearn.hypernet.MonoNonlinearHyperNet``: a monotone :class:`NonlinearCombiner`."""
    return NonlinearHyperNet(main_task, input_dim, hidden_sizes, dropout_rate, init_lower,
                             init_upper, weight_normalization, monotone=True)


def NoFCCNNHyperNet(main_task: int | None, reduction: str = "mean", input_channels: int = 3,
                    init_upper: float = 0.1, init_lower: float = 0.0,
                    weight_normalization: bool = True) -> ConvCombiner:
    """``auxilearn.hypernet.NoFCCNNHyperNet``: a :class:`ConvCombiner` with (8, 16, 32)."""
    return ConvCombiner(input_channels, main_task=main_task, reduction=reduction,
                        init_range=(init_lower, init_upper), weight_norm=weight_normalization)


def MonoNoFCCNNHyperNet(main_task: int | None, reduction: str = "mean",
                        init_upper: float = 0.1, init_lower: float = 0.0,
                        input_channels: int = 3, weight_normalization: bool = True
                        ) -> ConvCombiner:
    """``auxilearn.hypernet.MonoNoFCCNNHyperNet``: a monotone :class:`ConvCombiner`, (8, 16)."""
    return ConvCombiner(input_channels, main_task=main_task, reduction=reduction,
                        channels=(8, 16), init_range=(init_lower, init_upper),
                        weight_norm=weight_normalization, monotone=True)
