r"""Example weighting by a teacher network (Commentaries Alg. 1, Raghu et al. 2021).

A *commentary* teacher :math:`t_\phi` maps an example and the training progress to a weight
:math:`c_b = t_\phi(x_b, p) \in (0, 1)`, and the student is trained on the **summed**
weighted negative log-likelihood

.. math:: L_T(\theta, \phi) = \sum_{b=1}^{B} c_b \, \big(-\log f_\theta(x_b)_{y_b}\big),
          \qquad p = i / N_{\text{inner}},

where :math:`i = 0, 1, \dots, N_{\text{inner}} - 1` is the inner step (the seed's iteration
channel value, so ``p`` lies in ``[0, 0.99]`` for 100 steps). The meta-loss is the
*unweighted* validation NLL, summed within each validation batch and averaged over batches.

Conventions (``googleinterns/commentaries``, ``comms-weighting.py``):

* the sum over the batch (not the mean) is the seed's; with batch 8 it makes the effective
  learning rate 8x that of a mean;
* the teacher runs in train mode: its BatchNorm uses each batch's own statistics, and its
  running statistics are never read, so they are not carried;
* a ``nocurr`` teacher (no iteration channel) ignores ``progress``.

Example:
    >>> import torch
    >>> from bilevel.models import CBRTeacher
    >>> from bilevel.functional import module_state
    >>> teacher = CBRTeacher(1, iteration_channel=True)
    >>> phi, buffers = module_state(teacher)
    >>> x = torch.rand(4, 1, 28, 28)
    >>> c = example_weights(teacher, phi, buffers, x, progress=0.5)
    >>> c.shape, bool(((c > 0) & (c < 1)).all())
    (torch.Size([4]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bilevel.functional import Buffers, Params, call


def progress(step: int | torch.Tensor, steps: int) -> float | torch.Tensor:
    """The teacher's iteration-channel value ``step / steps`` (the seed's convention).

    Args:
        step: inner step index (0-based), or a tensor of them.
        steps: number of inner steps of the unroll the teacher is learned on.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (inner steps of the unroll), got {steps}")
    return step / steps


def example_weights(
    teacher: nn.Module, phi: Params, buffers: Buffers, x: torch.Tensor, *,
    progress: float | torch.Tensor,
) -> torch.Tensor:
    """Per-example weights ``c = t_φ(x, progress)``, shape ``[B]``, each in ``(0, 1)``.

    Args:
        teacher: a :class:`bilevel.models.CBRTeacher` (or any module ``(x, progress) -> [B, 1]``).
        phi: the teacher's parameters (the meta-parameters; may require grad).
        buffers: the teacher's buffers (cloned by :func:`bilevel.functional.call`, never updated).
        x: a batch ``[B, C, H, W]``.
        progress: the iteration-channel value (see :func:`progress`).
    """
    teacher.train()  # the seed keeps the teacher in train mode (per-batch BN statistics)
    c, _ = call(teacher, phi, buffers, x, progress)
    if c.dim() != 2 or c.shape[1] != 1 or c.shape[0] != x.shape[0]:
        raise ValueError(f"the teacher must return [B, 1] weights, got {tuple(c.shape)} for B={x.shape[0]}")
    return c[:, 0]  # [B]


def weighted_nll(log_probs: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``Σ_b c_b · NLL_b`` (summed over the batch, the seed's convention).

    Args:
        log_probs: ``[B, C]`` log-probabilities (the CBR student's output).
        y: ``[B]`` class labels.
        weights: ``[B]`` example weights; ``None`` gives the unweighted sum (the baseline).
    """
    nll = F.nll_loss(log_probs, y, reduction="none")  # [B]
    if weights is None:
        return nll.sum()
    if weights.shape != nll.shape:
        raise ValueError(f"weights must have shape {tuple(nll.shape)}, got {tuple(weights.shape)}")
    return (weights * nll).sum()
