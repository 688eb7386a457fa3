"""Data-parallel inner training on ``torch.distributed``: explicit all-reduces of trees.

``DistributedDataParallel`` only synchronises gradients of ``.backward()``; the gradients a
hypergradient method takes with ``torch.autograd.grad`` / ``torch.func.grad`` are not
all-reduced (pytorch/pytorch#63929), so bilevel never wraps a model in DDP on the
hypergradient path. Instead, with ``W`` ranks each holding a shard of the data:

1. inside ``step``, the local inner gradient ``g_r`` is averaged with the *differentiable*
   :func:`all_reduce_mean` (forward ``ḡ = (1/W) Σ_r g_r``; backward the same mean of the
   incoming adjoints), so every rank takes the identical update ``w' = w − lr·ḡ``;
2. each rank computes its own outer loss ``L_r`` (its validation shard, or the full
   validation set replicated) and its local hypergradient with any :mod:`bilevel.hypergrad`
   method;
3. :func:`average_tree` averages the hypergradients: ``dL/dλ = (1/W) Σ_r h_r``.

Why it is exact: with ``L = (1/W) Σ_r L_r``, the mean over ranks of the local adjoints equals
the true adjoint at every replicated tensor (it holds at the outer loss, is kept by every
replicated operation, and by the mean-all-reduce's backward), so the mean of the local
hypergradients is the full-batch hypergradient. tests/parallel/test_gloo.py checks it against
a single-process full-batch run in float64.

Launch with ``torchrun --nproc_per_node=N script.py`` (or ``--nnodes``); :func:`init_from_env`
reads torchrun's environment and picks gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from bilevel.errors import ConfigError
from bilevel.tree import Tree, tree_map

__all__ = ["all_reduce_mean", "average_tree", "broadcast_tree", "init_from_env", "rank",
           "shard", "shutdown", "world_size"]


def init_from_env(*, backend: str | None = None, device: torch.device | None = None
                  ) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); without ``WORLD_SIZE`` this is a single process and nothing happens.

    Args:
        backend: ``gloo`` or ``nccl``; default NCCL when ``device`` (or the default device)
            is CUDA, else gloo.
        device: the device this rank trains on; for NCCL its index becomes the current device.

    Returns:
        ``(rank, world_size)``.

    Raises:
        ConfigError: when the environment is incomplete, naming the missing variables.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with "
                          "`torchrun --nproc_per_node=N ...`, which sets all of them")
    cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def shutdown() -> None:
    """Leave the process group: a barrier, then ``destroy_process_group`` (no-op without one).

    The barrier matters: a rank that destroys its group while another is still finishing its
    last collective can make gloo abort the process ("terminate called without an active
    exception") under load.
    """
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


class _MeanAllReduce(torch.autograd.Function):
    """``y = (1/W) Σ_r x_r`` on every rank; its adjoint is the same mean of the adjoints."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y / dist.get_world_size()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _MeanAllReduce.apply(grad)  # differentiable again (double backward works)


def all_reduce_mean(tree: Tree) -> Tree:
    """Average a tree of tensors over ranks, differentiably (for inner gradients in ``step``).

    Every rank must call it with the same structure, in the same order. Without a process
    group it returns ``tree`` unchanged.
    """
    if world_size() == 1:
        return tree
    return tree_map(lambda x: _MeanAllReduce.apply(x) if torch.is_tensor(x) else x, tree)


def average_tree(tree: Tree) -> Tree:
    """Average a tree over ranks without a graph (for final hypergradients and metrics)."""
    if world_size() == 1:
        return tree

    def mean(x: Any) -> Any:
        if not torch.is_tensor(x):
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y / dist.get_world_size()
    return tree_map(mean, tree)


def broadcast_tree(tree: Tree, *, src: int = 0) -> Tree:
    """Rank ``src``'s tensors on every rank (initial weights, meta-parameters)."""
    if world_size() == 1:
        return tree

    def bcast(x: Any) -> Any:
        if not torch.is_tensor(x):
            return x
        y = x.detach().clone().contiguous()
        dist.broadcast(y, src=src)
        return y
    return tree_map(bcast, tree)


def shard(n: int, *, rank: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous slice of ``n`` examples.

    Raises:
        ConfigError: unless ``n`` divides evenly (the mean of shard means is then the
            full-batch mean, which exactness needs); drop or pad examples first.
    """
    r, w = (rank if rank is not None else globals()["rank"](),
            world if world is not None else world_size())
    if n % w:
        raise ConfigError(f"{n} examples do not split evenly over {w} ranks; use a multiple "
                          f"of {w} (drop {n % w}) so shard means average to the full mean")
    size = n // w
    return slice(r * size, (r + 1) * size)
