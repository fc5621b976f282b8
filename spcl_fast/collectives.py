"""The collectives the ops and methods need, as no-ops outside a process group: one place that
calls ``torch.distributed`` for model code (the training engine's process group, its model
wrappers and host-side votes live in :mod:`spcl_fast.train.distributed`). A leaf: it imports
nothing of the package.

Example::

    >>> x = torch.ones(2, 3)
    >>> world_size(), rank(), all_gather(x).shape, all_reduce_mean_(x.clone()).sum().item()
    (1, 0, torch.Size([2, 3]), 6.0)
    >>> all_gather_with_grad(x) is x  # one process: the rows themselves
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated along dim 0 in rank order (no gradient; see
    :func:`all_gather_with_grad`)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``t`` over processes (asynchronous on a GPU: no host sync)."""
    if active():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


class _AllGatherRows(torch.autograd.Function):
    """Forward: every rank's rows, rank-major. Backward: each rank's loss depends on this
    rank's rows, so they get the sum over ranks of the gathered gradient (a reduce-scatter).
    With each rank's loss the mean over its own queries and DDP averaging parameter gradients
    over ranks, parameters get exactly the gradient of the mean loss over the global batch."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.world, ctx.rank, ctx.rows = dist.get_world_size(), dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        total = grad.clone()  # gloo has no reduce-scatter: sum it all, keep this rank's rows
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].clone()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``(M, ...)`` rows concatenated along dim 0 in rank order, with gradient:
    this process's rows receive the sum over processes of the gradient of their copies. Integer
    tensors (ids) pass through the same gather without gradient."""
    return _AllGatherRows.apply(x) if active() else x
