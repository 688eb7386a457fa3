r"""Label-pair blending proportions (Commentaries Alg. 2, Raghu et al. 2021): a learned mixup.

The commentary is a matrix of raw logits :math:`M \in \mathbb{R}^{C \times C}`, initialised to
:math:`-1`. For an example of class :math:`i` blended with one of class :math:`j` the proportion
kept from the first is

.. math:: \lambda_{ij} = 1 - \tfrac12 \sigma(M_{ij}) \in (0.5, 1), \qquad
          \lambda_{ij}\big|_{M=-1} \approx 0.866.

Within a batch, with a random permutation :math:`\pi` of the batch,

.. math::
    \lambda_b = \lambda_{y_b, y_{\pi(b)}}, \qquad
    \tilde x_b = \lambda_b x_b + (1 - \lambda_b) x_{\pi(b)}, \\
    L_T = \frac1B \sum_b \Big[\lambda_b\,\mathrm{CE}(f(\tilde x)_b, y_b)
          + (1 - \lambda_b)\,\mathrm{CE}(f(\tilde x)_b, y_{\pi(b)})\Big].

This is ``mixup_data`` / ``mixup_criterion`` of ``googleinterns/commentaries``
``third_party/implicit_hyper_opt/train_mixup.py``, vectorised (the seed loops over the batch).
The validation loss is plain cross-entropy on clean data, so :math:`\partial L_V / \partial M = 0`
and the whole hypergradient is the implicit term.

Example:
    >>> import torch
    >>> m = init_logits(3)
    >>> round(float(proportions(m)[0, 1].detach()), 4)
    0.8655
    >>> x, y = torch.rand(4, 2), torch.tensor([0, 1, 2, 0])
    >>> xb, lam = blend(x, y, m, torch.tensor([1, 0, 3, 2]))
    >>> xb.shape, lam.shape
    (torch.Size([4, 2]), torch.Size([4]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INIT_LOGIT = -1.0


def init_logits(num_classes: int, *, value: float = INIT_LOGIT, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The seed's initial ``M``: a ``[C, C]`` matrix of ``value`` (default ``-1``), requiring grad."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 to blend label pairs, got {num_classes}")
    return torch.full((num_classes, num_classes), float(value), dtype=dtype, device=device,
                      requires_grad=True)


def proportions(logits: torch.Tensor) -> torch.Tensor:
    """``λ = 1 − 0.5·σ(M)``, elementwise, in ``(0.5, 1)``."""
    return 1.0 - 0.5 * torch.sigmoid(logits)


def logits_for(lam: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`proportions`: ``M = logit(2(1 − λ))`` for ``λ ∈ (0.5, 1)``.

    Used for the *random blending* baseline: draw ``λ ~ U(0.5, 1)`` and store its logits. (The
    seed's ``--rand_mixup`` pushes the U(0.5, 1) draws through ``1 − 0.5σ(·)`` as if they were
    logits, so its "random" proportions all lie in ``[0.635, 0.689]``: that arm is
    :func:`seed_random_logits`.)
    """
    if not bool(((lam > 0.5) & (lam < 1.0)).all()):
        raise ValueError("blending proportions must lie strictly between 0.5 and 1")
    return torch.logit(2.0 * (1.0 - lam))


SEED_RANDOM_RANGE = (0.6345, 0.6888)  # 1 − 0.5σ(1), 1 − 0.5σ(0.5), rounded outwards


def seed_random_logits(num_classes: int, *, seed: int) -> torch.Tensor:
    """The seed's random arm (``test_mixup.py --rand_mixup``): logits ``M_ij ~ U(0.5, 1)``.

    The seed draws the random grid as ``M`` itself, the raw blending parameters, and pushes it
    through ``λ = 1 − 0.5σ(M)`` like a learned grid, so every proportion lies in
    ``[1 − 0.5σ(1), 1 − 0.5σ(0.5)] ≈ [0.6345, 0.6888]`` (:data:`SEED_RANDOM_RANGE`): much more
    blending than the learned grid's start (0.866). The draw is the seed's own
    (``np.random.RandomState(seed).uniform(0.5, 1.0, (C, C))`` in float32), so seed ``s`` gives
    the seed's grid for ``--seed s``. Not requiring grad.
    """
    import numpy as np

    grid = np.random.RandomState(seed).uniform(0.5, 1.0, (num_classes, num_classes))
    return torch.from_numpy(grid.astype(np.float32))


def random_logits(num_classes: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits of proportions drawn i.i.d. ``U(0.5, 1)`` per class pair (not requiring grad).

    Our uniform random arm; :func:`seed_random_logits` is the seed's."""
    u = torch.rand(num_classes, num_classes, generator=generator, dtype=torch.float64)
    lam = 0.5 + 0.5 * u.clamp(1e-6, 1 - 1e-6)
    return logits_for(lam).float()


def blend(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, perm: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blended inputs ``x̃`` (shaped like ``x``) and the per-example proportions ``λ_b`` ``[B]``.

    Args:
        x: inputs ``[B, ...]``.
        y: labels ``[B]``.
        logits: ``M`` ``[C, C]`` (may require grad; gradients reach it through ``x̃`` and ``λ_b``).
        perm: a permutation of ``range(B)`` (the partner of each example).
    """
    if perm.shape != y.shape:
        raise ValueError(f"perm must have shape {tuple(y.shape)}, got {tuple(perm.shape)}")
    lam = proportions(logits)[y, y[perm]].to(x.dtype)  # [B]
    shape = (-1,) + (1,) * (x.dim() - 1)
    return lam.view(shape) * x + (1 - lam.view(shape)) * x[perm], lam


def blended_loss(logits_or_log_probs: torch.Tensor, y: torch.Tensor, perm: torch.Tensor,
                 lam: torch.Tensor) -> torch.Tensor:
    """``mean_b[λ_b CE(f(x̃)_b, y_b) + (1 − λ_b) CE(f(x̃)_b, y_π(b))]`` (the two-target loss).

    ``F.cross_entropy`` normalises its input, so log-probabilities (the CBR student) and raw
    logits (ResNet-18) both work.
    """
    ce_a = F.cross_entropy(logits_or_log_probs, y, reduction="none")  # [B]
    ce_b = F.cross_entropy(logits_or_log_probs, y[perm], reduction="none")  # [B]
    return (lam * ce_a + (1 - lam) * ce_b).mean()
