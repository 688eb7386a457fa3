r"""Generative teaching: a generator, its curriculum inputs and the learner's learned optimiser.

A :class:`Teacher` holds everything a Generative Teaching Network (Such et al., ICML 2020)
learns about how a fresh learner should be trained for ``steps`` SGD steps:

* ``generator.*``: the image generator :math:`G_\theta(z, y)` (any module taking
  ``(z [n, noise_dim], y [n] int64)`` and returning images);
* the curriculum :math:`Z \in \mathbb{R}^{T \times B \times d}` (one noise vector per inner step
  and batch position), depending on ``curriculum``:

  - ``"learned"``: ``Z`` is the parameter ``z`` (the paper's "full curriculum");
  - ``"random_fixed"``: ``Z`` is sampled once at construction and frozen (buffer ``z``);
  - ``"random"``: ``Z`` is drawn afresh for every inner loop (the paper's "no curriculum");

  ``Z`` is initialised ``U[0, 1)`` as in ``GoodAI/GTN``;
* the labels, fixed per batch position: ``y_b = b mod num_classes`` at every inner step;
* the learner's learning rate and momentum, stored as ``lr_raw`` and ``momentum_raw``
  (initial values 0.02 and 0.5 as in the seed) and read through ``lr_param``:

  - ``"capped"`` (default): the raw values clamped into ``lr_range`` and ``momentum_range``;
    outside the range the hypergradient of that value is zero (``torch.clamp``'s), so it stays
    at the bound until Adam's momentum carries it back. Over 1500 outer steps of Experiment C
    (3 seeds) this was the stable choice: the lr reaches the cap 1 by step ~600 and test
    accuracy holds, where with the other two the lr climbs past 2 and accuracy sags
    (docs/results.md);
  - ``"raw"``: :math:`\eta = \rho_\eta`, :math:`\mu = \rho_\mu`, as ``GoodAI/GTN`` learns
    them (nothing keeps them positive or the momentum below 1);
  - ``"softplus"``: :math:`\eta = \operatorname{softplus}(\rho_\eta)`,
    :math:`\mu = \operatorname{sigmoid}(\rho_\mu)`, always valid.

Everything is read *functionally* from a parameter dict ``hp`` (``dict(teacher.named_parameters())``
or a tree handed to a hypergradient method), so the teacher can sit in the ``hparams`` of
:func:`bilevel.hypergrad.unrolled`. The generator's BatchNorm layers always normalise with the
statistics of the batch being generated (one inner step's ``B`` images); their running
statistics are neither used nor updated, so generating is a pure function of ``hp`` and ``Z``.

Example:
    >>> import torch
    >>> from bilevel.recipes.gtn.models import GTNTeacher
    >>> gen = GTNTeacher(noise_dim=8, fc1_size=16, map_filters=4, map_size=7, conv1_filters=4)
    >>> teacher = Teacher(gen, curriculum="learned", steps=3, batch_size=10, noise_dim=8)
    >>> hp = teacher.hparams()
    >>> x, y = teacher.batch(hp, 0)
    >>> x.shape, y.tolist()[:3], round(float(teacher.learner_lr(hp).detach()), 4)
    (torch.Size([10, 1, 28, 28]), [0, 1, 2], 0.02)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.functional import call

Curriculum = Literal["learned", "random_fixed", "random"]
CURRICULA: tuple[str, ...] = ("learned", "random_fixed", "random")
LrParam = Literal["softplus", "raw", "capped"]
LR_PARAMS: tuple[str, ...] = ("softplus", "raw", "capped")


def softplus_inverse(value: float) -> float:
    """:math:`\\rho` with :math:`\\operatorname{softplus}(\\rho) = ` ``value`` (> 0)."""
    if not value > 0:
        raise ValueError(f"a softplus-parametrised value must be > 0, got {value}")
    return value + math.log(-math.expm1(-value))


def logit(value: float) -> float:
    """:math:`\\rho` with :math:`\\operatorname{sigmoid}(\\rho) = ` ``value`` in (0, 1)."""
    if not 0 < value < 1:
        raise ValueError(f"a sigmoid-parametrised value must be in (0, 1), got {value}")
    return math.log(value / (1 - value))


class Teacher(nn.Module):
    """Generator + curriculum inputs + learned learner LR and momentum (see module docstring).

    Args:
        generator: maps ``(z [n, noise_dim], y [n])`` to images ``[n, C, H, W]``.
        curriculum: ``"learned"``, ``"random_fixed"`` or ``"random"``.
        steps: inner steps ``T`` per inner loop.
        batch_size: images per inner step ``B``.
        noise_dim: size ``d`` of each noise vector.
        num_classes: labels cycle through ``0..num_classes-1`` along the batch.
        lr: initial learner learning rate (> 0).
        momentum: initial learner momentum in (0, 1).
        seed: seed of the generator drawing the initial (or fixed) ``Z``.
        lr_param: how ``lr_raw``/``momentum_raw`` map to lr and momentum (module docstring).
        lr_range: ``(low, high)`` of the lr for ``"capped"``.
        momentum_range: ``(low, high)`` of the momentum for ``"capped"``.
    """

    def __init__(self, generator: nn.Module, *, curriculum: Curriculum, steps: int,
                 batch_size: int, noise_dim: int, num_classes: int = 10, lr: float = 0.02,
                 momentum: float = 0.5, seed: int = 0, lr_param: LrParam = "capped",
                 lr_range: tuple[float, float] = (1e-4, 1.0),
                 momentum_range: tuple[float, float] = (0.0, 0.99)) -> None:
        super().__init__()
        if curriculum not in CURRICULA:
            raise ValueError(f"curriculum must be one of {CURRICULA}, got {curriculum!r}")
        if lr_param not in LR_PARAMS:
            raise ValueError(f"lr_param must be one of {LR_PARAMS}, got {lr_param!r}")
        if lr_param == "capped" and not (lr_range[0] <= lr <= lr_range[1]
                                         and momentum_range[0] <= momentum <= momentum_range[1]):
            raise ValueError(f"capped: the initial lr {lr} and momentum {momentum} must lie in "
                             f"lr_range {lr_range} and momentum_range {momentum_range}")
        self.lr_param: LrParam = lr_param
        self.lr_range, self.momentum_range = tuple(lr_range), tuple(momentum_range)
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
        self.curriculum: Curriculum = curriculum
        self.steps, self.batch_size, self.noise_dim = steps, batch_size, noise_dim
        self.generator = generator
        smooth = lr_param == "softplus"
        self.lr_raw = nn.Parameter(torch.tensor(softplus_inverse(lr) if smooth else float(lr)))
        self.momentum_raw = nn.Parameter(torch.tensor(logit(momentum) if smooth else float(momentum)))
        z0 = torch.rand(steps, batch_size, noise_dim, generator=torch.Generator().manual_seed(seed))
        if curriculum == "learned":
            self.z = nn.Parameter(z0)  # [T, B, d]
        elif curriculum == "random_fixed":
            self.register_buffer("z", z0)  # [T, B, d]
        self.register_buffer("labels", torch.arange(batch_size) % num_classes)  # [B]

    def hparams(self) -> dict[str, Tensor]:
        """The learned tensors by name (the ``hparams`` tree of a hypergradient method)."""
        return dict(self.named_parameters())

    def learner_lr(self, hp: dict[str, Tensor]) -> Tensor:
        """The learner's lr from ``hp["lr_raw"]``: softplus, raw, or raw clamped (``lr_param``)."""
        rho = hp["lr_raw"]
        if self.lr_param == "softplus":
            return F.softplus(rho)
        return rho if self.lr_param == "raw" else rho.clamp(*self.lr_range)

    def learner_momentum(self, hp: dict[str, Tensor]) -> Tensor:
        """The learner's momentum from ``hp["momentum_raw"]``: sigmoid, raw, or raw clamped."""
        rho = hp["momentum_raw"]
        if self.lr_param == "softplus":
            return torch.sigmoid(rho)
        return rho if self.lr_param == "raw" else rho.clamp(*self.momentum_range)

    def sample_noise(self, *, generator: torch.Generator | None = None) -> Tensor | None:
        """Fresh ``Z`` ``[T, B, d]`` for the ``random`` curriculum, else ``None`` (no draw)."""
        if self.curriculum != "random":
            return None
        device = self.labels.device
        return torch.rand(self.steps, self.batch_size, self.noise_dim, generator=generator,
                          device=device)

    def noise(self, hp: dict[str, Tensor], t: int, drawn: Tensor | None = None) -> Tensor:
        """The noise of inner step ``t``, ``[B, d]``: ``hp["z"][t]``, the frozen ``z[t]``, or
        ``drawn[t]`` (``random``; ``drawn`` from :meth:`sample_noise`)."""
        if self.curriculum == "learned":
            return hp["z"][t]
        if self.curriculum == "random_fixed":
            return self.z[t]
        if drawn is None:
            raise ValueError("the 'random' curriculum needs the drawn noise: pass "
                             "drawn=teacher.sample_noise(generator=...)")
        return drawn[t]

    def generate(self, hp: dict[str, Tensor], z: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` from noise ``z`` ``[B, d]`` with the fixed labels."""
        gen_params = {k[len("generator."):]: v for k, v in hp.items() if k.startswith("generator.")}
        gen_buffers = {k: v for k, v in self.generator.named_buffers()}
        was_training = self.generator.training
        self.generator.train()  # batch statistics, always (see module docstring)
        try:
            images, _ = call(self.generator, gen_params, gen_buffers, z, self.labels)
        finally:
            self.generator.train(was_training)
        return images

    def batch(self, hp: dict[str, Tensor], t: int, drawn: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
        """Inner step ``t``'s synthetic batch: ``(images [B, C, H, W], labels [B])``."""
        return self.generate(hp, self.noise(hp, t, drawn)), self.labels

    def curriculum_noise(self, hp: dict[str, Tensor], drawn: Tensor | None = None) -> Tensor:
        """All of ``Z`` ``[T, B, d]`` (detached), e.g. to save or to shuffle."""
        return torch.stack([self.noise(hp, t, drawn).detach() for t in range(self.steps)])


def shuffled_order(steps: int, *, generator: torch.Generator) -> list[int]:
    """A random order of the inner steps for the shuffle test, never the identity.

    The ``GoodAI/GTN`` shuffle test permutes ``Z`` along the step dimension; a permutation
    that happens to be the identity would make the "shuffled" learner an "in order" one, so
    it is redrawn (for ``steps >= 2``; one step has no other order and is rejected).
    """
    if steps < 2:
        raise ValueError(f"shuffling needs at least 2 inner steps, got {steps}")
    identity = list(range(steps))
    while True:
        order = torch.randperm(steps, generator=generator).tolist()
        if order != identity:
            return order
