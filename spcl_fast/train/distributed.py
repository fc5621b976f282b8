"""Multi-process training under ``torchrun``: the process group, the model's wrappers (DDP or
FSDP2, then ``torch.compile``), full state dicts for checkpoints, and the host-side agreement
the loop needs.

``torchrun --nproc_per_node=N [--nnodes ... --rdzv-endpoint ...] -m spcl_fast.train ...`` sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; each process then drives ``cuda:LOCAL_RANK`` (NCCL)
or, on CPU, a share of the cores (gloo, how it is tested on a machine without GPUs). A second,
gloo group carries the host-side votes (stop on a signal, which checkpoint to resume from), so
agreeing on them never waits for the GPU.

S-PCL's loss sees the global batch: under torchrun the engine builds the method with
``BuildContext(gather_distributed=True)``, and InfoNCE's all-gather has a gradient, so after
DDP's gradient average the update equals one process's on the whole batch. The collectives of
model code (that gather's statistics, DINO's centre) go through :mod:`spcl_fast.collectives`.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .. import collectives
from ..nn.vit import Block
from ..run.device import resolve_device
from ..run.precision import PRECISIONS


@dataclasses.dataclass
class DistContext:
    """This process's place in the run. ``control`` is the gloo group for host-side
    collectives (``None``: the default group, when that is gloo already); ``owns`` says whether
    :func:`setup` created the process group (and :func:`teardown` should destroy it)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    control: object = None
    owns: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks (a host-side vote through the gloo group: no GPU
        sync)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (picklable objects, through the gloo group)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place mean of a device tensor over ranks (the default group: asynchronous on a
        GPU, no host sync)."""
        return collectives.all_reduce_mean_(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.control)


_ACTIVE: DistContext | None = None
TEARDOWN_WAIT = datetime.timedelta(hours=24)


def setup(device: str) -> DistContext:
    """This process's :class:`DistContext`: single-process without ``torchrun`` (no group),
    otherwise the process group, created here (NCCL on ``cuda:LOCAL_RANK``, gloo on CPU) unless
    one exists already (then it is reused, and not owned)."""
    global _ACTIVE
    if _ACTIVE is not None:
        return dataclasses.replace(_ACTIVE, owns=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if world == 1 and not initialized:
        return DistContext(resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":  # one GPU per process, whatever index was named
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if not initialized:
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=target if target.type == "cuda" else None)
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    ctx = DistContext(target, dist.get_rank(), dist.get_world_size(), control,
                      owns=not initialized)
    if ctx.owns:  # a group someone else made may go away without telling us
        _ACTIVE = ctx
    return ctx


def teardown(ctx: DistContext, clean: bool = False) -> None:
    """Destroy the process group if ``ctx`` created it. ``clean``: every rank got here without
    an error, so wait for all of them first (a gloo rank whose peer destroys the group while it
    is still shutting its connections down can abort at exit); after an error there is no
    barrier, since a crashed peer would never reach it."""
    global _ACTIVE
    if ctx.owns:
        try:
            if clean and ctx.world > 1:
                # Rank 0 may still be probing the encoder (minutes to hours on a large set):
                # wait for it far longer than gloo's default 30-minute collective timeout.
                dist.monitored_barrier(group=ctx.control, timeout=TEARDOWN_WAIT)
        finally:
            _ACTIVE = None
            dist.destroy_process_group()


def wrap_model(model: nn.Module, optim, ctx: DistContext) -> tuple[nn.Module, nn.Module | None]:
    """``(net, ddp)``: what the training step calls (the model, its DDP or FSDP2 form, compiled
    with ``optim.compile``; ``optim`` an :class:`~spcl_fast.run.config.OptimConfig`) and the DDP
    wrapper (``None`` without DDP), for ``no_sync``.

    FSDP2 (``optim.fsdp``) shards every transformer block and then the rest of the model, with
    the weights all-gathered in the autocast dtype and gradients reduced in fp32; ``model``
    itself becomes the sharded module (its parameters DTensors)."""
    net, ddp = model, None
    if ctx.world > 1 and optim.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        dtype = PRECISIONS[optim.precision]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    elif ctx.world > 1:
        # Buffers are constants or kept in sync by the method (DINO's centre): no per-forward
        # broadcast. Newer torch spells the option forward_sync_buffers.
        ddp_args = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in ddp_args
                   else "broadcast_buffers": False}
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **no_sync,
        )
        net = ddp
    elif optim.fsdp:
        warnings.warn("fsdp needs several processes (torchrun); training unsharded",
                      stacklevel=2)
    if optim.compile:
        net = torch.compile(net)
    return net, ddp


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(model: nn.Module, fsdp: bool) -> dict:
    """The full model state dict (plain names, as one process would save it). Under FSDP a
    collective: every rank calls it, rank 0 gets the tensors on CPU, the others ``{}``."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer's state dict; under FSDP the full one keyed by parameter names (a
    collective, like :func:`model_state`)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         fsdp: bool) -> None:
    """Inverse of :func:`optimizer_state` (every rank passes the full state)."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options())
