"""The collectives the methods need, as no-ops outside a process group: one place that calls
``torch.distributed`` for model code (the training engine's process group, its model wrappers
and host-side votes live in :mod:`spcl_fast.train.distributed`).

Example::

    >>> x = torch.ones(2, 3)
    >>> world_size(), rank(), all_gather(x).shape, all_reduce_mean_(x.clone()).sum().item()
    (1, 0, torch.Size([2, 3]), 6.0)
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
    :func:`spcl_fast.info_nce`'s ``gather_distributed`` for the differentiable gather)."""
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
