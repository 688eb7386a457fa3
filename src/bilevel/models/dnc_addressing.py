r"""The memory addressing of the Differentiable Neural Computer (Graves et al., Nature 2016,
Methods), as pure batched functions.

Shapes: ``B`` batch, ``N`` memory slots, ``W`` word size, ``H`` heads. Memory ``M`` is
``[B, N, W]``; a weighting over slots is ``[B, N]`` (one write head) or ``[B, H, N]``.

* Content: :math:`C(M, k, \beta)[i] = \operatorname{softmax}_i(\beta \cos(k, M[i]))`.
* Usage: :math:`\psi = \prod_h (1 - f_h w^r_{t-1,h})`,
  :math:`u_t = (u_{t-1} + w^w_{t-1} - u_{t-1} \circ w^w_{t-1}) \circ \psi`.
* Allocation: with :math:`\phi` the slots sorted by ascending usage,
  :math:`a[\phi_j] = (1 - u[\phi_j]) \prod_{i<j} u[\phi_i]`.
* Link: :math:`L_t[i,j] = (1 - w_i - w_j) L_{t-1}[i,j] + w_i p_{t-1}[j]`, zero diagonal;
  precedence :math:`p_t = (1 - \sum_i w_i) p_{t-1} + w`.
* Directional reads: forward :math:`f_h = L_t w^r_{t-1,h}`, backward
  :math:`b_h = L_t^\top w^r_{t-1,h}`.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6  # inside norms (memory starts at zero) and in the allocation's usage floor


def content_weighting(memory: Tensor, keys: Tensor, strengths: Tensor) -> Tensor:
    """Softmax over slots of ``strength * cosine(key, slot)``.

    ``memory [B, N, W]``, ``keys [B, H, W]``, ``strengths [B, H]`` -> ``[B, H, N]``.
    Norms are ``sqrt(|x|^2 + EPS)`` so that the all-zero initial memory has finite gradients.
    """
    dots = keys @ memory.transpose(1, 2)  # [B, H, N]
    key_norm = (keys.pow(2).sum(-1) + EPS).sqrt()  # [B, H]
    mem_norm = (memory.pow(2).sum(-1) + EPS).sqrt()  # [B, N]
    cosine = dots / (key_norm[:, :, None] * mem_norm[:, None, :])
    return torch.softmax(strengths[:, :, None] * cosine, dim=-1)


def update_usage(usage: Tensor, write_weights: Tensor, free_gates: Tensor,
                 read_weights: Tensor) -> Tensor:
    """``u_t`` from ``u_{t-1} [B, N]``, the previous write ``[B, N]``, this step's free
    gates ``[B, H]`` and the previous read weightings ``[B, H, N]``."""
    retention = (1 - free_gates[:, :, None] * read_weights).prod(dim=1)  # [B, N]
    return (usage + write_weights - usage * write_weights) * retention


def allocation_weighting(usage: Tensor) -> Tensor:
    """``a [B, N]``: the least used slot gets ``1 - u``, the next ``(1 - u')·u``, and so on.

    Usage is floored at ``EPS`` (``EPS + (1 - EPS) u``) so products stay non-zero; the sort
    order is a constant for autograd, the values are not.
    """
    usage = EPS + (1 - EPS) * usage
    sorted_usage, order = usage.sort(dim=-1)  # ascending: the free list phi
    before = torch.cumprod(torch.cat([torch.ones_like(sorted_usage[:, :1]),
                                      sorted_usage[:, :-1]], dim=-1), dim=-1)
    return torch.zeros_like(usage).scatter(-1, order, (1 - sorted_usage) * before)


def write_weighting(memory: Tensor, key: Tensor, strength: Tensor, allocation: Tensor,
                    allocation_gate: Tensor, write_gate: Tensor) -> Tensor:
    """``g^w [g^a a + (1 - g^a) c^w]`` for one write head: ``key [B, W]``, gates and
    ``strength [B]``, ``allocation [B, N]`` -> ``[B, N]``."""
    content = content_weighting(memory, key[:, None], strength[:, None])[:, 0]
    ga, gw = allocation_gate[:, None], write_gate[:, None]
    return gw * (ga * allocation + (1 - ga) * content)


def write_memory(memory: Tensor, weights: Tensor, erase: Tensor, values: Tensor) -> Tensor:
    """``M ∘ (1 - w eᵀ) + w vᵀ``: ``weights [B, N]``, ``erase``/``values [B, W]``."""
    return memory * (1 - weights[:, :, None] * erase[:, None, :]) + \
        weights[:, :, None] * values[:, None, :]


def update_link(link: Tensor, precedence: Tensor, write_weights: Tensor) -> Tensor:
    """``L_t [B, N, N]`` from ``L_{t-1}``, the previous precedence ``p_{t-1} [B, N]`` and
    this step's write weighting ``w [B, N]``; the diagonal is zero."""
    w_i, w_j = write_weights[:, :, None], write_weights[:, None, :]
    new = (1 - w_i - w_j) * link + w_i * precedence[:, None, :]
    return new.diagonal_scatter(torch.zeros_like(write_weights), dim1=1, dim2=2)


def update_precedence(precedence: Tensor, write_weights: Tensor) -> Tensor:
    """``p_t = (1 - Σ_i w_i) p_{t-1} + w`` (``[B, N]``)."""
    return (1 - write_weights.sum(-1, keepdim=True)) * precedence + write_weights


def directional_weightings(link: Tensor, read_weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(forward, backward)``, each ``[B, H, N]``: ``L w`` and ``Lᵀ w`` per read head."""
    forward = read_weights @ link.transpose(1, 2)  # f[h, i] = sum_j L[i, j] w[h, j]
    backward = read_weights @ link  # b[h, j] = sum_i L[i, j] w[h, i]
    return forward, backward
