"""``info_nce``: the contrastive loss between two views' embeddings, without an (M, M) matrix.

Layers (as in ``partition_attention``): the Triton launchers in ``spcl_fast.kernels.info_nce``
and the chunked PyTorch fallback in ``spcl_fast.reference.info_nce`` share one signature; two
``torch.library`` custom ops (forward, backward) dispatch between them, so ``torch.compile``
traces the op as one node and ``FlopCounterMode`` counts it with the formula of
``spcl_fast.flops``; the autograd formula is registered on the forward op.

The custom ops compute the *statistics* of one query/key problem — per-query log-sum-exp over
its candidates, the positive logit, optionally the per-key (column) log-sum-exp — and their
backward takes the gradients of those statistics, so every variant of the loss (CLIP's
symmetric cross-view loss, SimCLR's NT-Xent, global negatives across ranks) is a few cheap
PyTorch ops on ``O(M)`` vectors around the same two ops.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import flops
from .._impl import resolve_impl
from ..collectives import all_gather_with_grad
from ..reference.info_nce import NEGATIVES, info_nce_chunked_bwd, info_nce_chunked_fwd
from ._checks import FLOAT_DTYPES, require, require_dtype, require_same_device

OP = "info_nce"


def _launchers(impl: str):
    if impl == "triton":
        from ..kernels.info_nce import info_nce_bwd, info_nce_fwd

        return info_nce_fwd, info_nce_bwd
    return info_nce_chunked_fwd, info_nce_chunked_bwd


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("spcl_fast::info_nce_fwd", mutates_args=())
def _fwd(
    zq: torch.Tensor,
    zk: torch.Tensor,
    scale: float,
    key_offset: int,
    pos_shift: int,
    pos_mod: int,
    self_mask: bool,
    col_lse: bool,
    groups_q: torch.Tensor | None,
    groups_k: torch.Tensor | None,
    chunk: int,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd, _ = _launchers(impl)
    extra = {} if impl == "triton" else {"chunk": chunk or None}
    return fwd(zq, zk, scale, key_offset, pos_shift, pos_mod, self_mask, col_lse,
               groups_q=groups_q, groups_k=groups_k, **extra)


@_fwd.register_fake
def _fwd_fake(zq, zk, scale, key_offset, pos_shift, pos_mod, self_mask, col_lse, groups_q,
              groups_k, chunk, impl):
    sd = _stat_dtype(zq.dtype)
    mq, mk = zq.shape[0], zk.shape[0]
    return (zq.new_empty(mq, dtype=sd), zq.new_empty(mq, dtype=sd),
            zq.new_empty(mk if col_lse else 0, dtype=sd), zq.new_empty(mq, dtype=sd),
            zq.new_empty(mk, dtype=sd))


def bwd_design(mq: int, mk: int, d: int, dtype: torch.dtype, symmetric: bool,
               device: torch.device) -> str:
    """Which Triton backward a call runs: the cost model's choice
    (:func:`spcl_fast.kernels.cost.choose_bwd_design`)."""
    from ..kernels.cost import choose_bwd_design

    return choose_bwd_design(mq, mk, d, dtype, symmetric, device)


@torch.library.custom_op("spcl_fast::info_nce_bwd", mutates_args=())
def _bwd(
    zq: torch.Tensor,
    zk: torch.Tensor,
    inv_q: torch.Tensor,
    inv_k: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    d_row: torch.Tensor,
    d_col: torch.Tensor,
    d_pos: torch.Tensor,
    scale: float,
    key_offset: int,
    pos_shift: int,
    pos_mod: int,
    self_mask: bool,
    groups_q: torch.Tensor | None,
    groups_k: torch.Tensor | None,
    chunk: int,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, bwd = _launchers(impl)
    if impl == "triton":
        symmetric = col_lse.numel() > 0 and d_col.numel() > 0
        extra = {"design": bwd_design(zq.shape[0], zk.shape[0], zq.shape[1], zq.dtype, symmetric,
                                      zq.device)}
    else:
        extra = {"chunk": chunk or None}
    return bwd(zq, zk, inv_q, inv_k, row_lse, col_lse, d_row, d_col, d_pos, scale, key_offset,
               pos_shift, pos_mod, self_mask, groups_q=groups_q, groups_k=groups_k, **extra)


@_bwd.register_fake
def _bwd_fake(zq, zk, *args):
    return torch.empty_like(zq), torch.empty_like(zk)


def _setup_context(ctx, inputs, output):
    (zq, zk, scale, key_offset, pos_shift, pos_mod, self_mask, col_lse, groups_q, groups_k, chunk,
     impl) = inputs
    row_lse, _, col, inv_q, inv_k = output
    ctx.mark_non_differentiable(inv_q, inv_k)
    ctx.set_materialize_grads(False)  # unused statistics get None, not (M,) zeros
    ctx.save_for_backward(zq, zk, inv_q, inv_k, row_lse, col, groups_q, groups_k)
    ctx.args = (scale, key_offset, pos_shift, pos_mod, self_mask)
    ctx.impl = (chunk, impl)


def _backward(ctx, d_row, d_pos, d_col, _d_inv_q, _d_inv_k):
    zq, zk, inv_q, inv_k, row_lse, col, groups_q, groups_k = ctx.saved_tensors

    def vec(g, like):  # autograd hands in None for unused outputs, expanded views for means
        return torch.zeros_like(like) if g is None else g.to(like.dtype).contiguous()

    dzq, dzk = _bwd(zq, zk, inv_q, inv_k, row_lse, col, vec(d_row, row_lse), vec(d_col, col),
                    vec(d_pos, row_lse), *ctx.args, groups_q, groups_k, *ctx.impl)
    return dzq, dzk, None, None, None, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.spcl_fast.info_nce_fwd, get_raw=True)
def _fwd_flops(zq, zk, *args, out_val=None, **kwargs):
    return flops.info_nce_flops(zq.shape[0], zk.shape[0], zq.shape[1])


@register_flop_formula(torch.ops.spcl_fast.info_nce_bwd, get_raw=True)
def _bwd_flops(zq, zk, *args, out_val=None, **kwargs):
    return flops.info_nce_bwd_flops(zq.shape[0], zk.shape[0], zq.shape[1])


# ---------------------------------------------------------------------------------------------
# Global negatives across ranks.


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{OP}: gather_distributed=True needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or launch with torchrun); pass "
            "gather_distributed=False for a single process"
        )
    return dist.get_world_size(), dist.get_rank()


# ---------------------------------------------------------------------------------------------


MIN_TEMPERATURE = 1e-4
GROUP_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _validate_groups(groups, z_a) -> None:
    if groups is None:
        return
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"{OP}: groups must be None or an (M,) integer tensor, got "
                        f"{type(groups).__name__}")
    require_dtype(groups, "groups", OP, GROUP_DTYPES)
    require(groups.shape == z_a.shape[:1], OP, lambda: f"groups must have shape (M,) = "
            f"({z_a.shape[0]},), one id per row of z_a and z_b, got {tuple(groups.shape)}")
    require_same_device(OP, z_a=z_a, groups=groups)


def _validate(z_a, z_b, temperature, symmetric, negatives, impl) -> None:
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(z, torch.Tensor) or z.dim() != 2:
            raise ValueError(f"{OP}: {name} must be an (M, d) tensor, got "
                             f"{getattr(z, 'shape', type(z))}")
    require(z_a.shape == z_b.shape, OP, lambda: f"z_a and z_b must have the same shape, got "
            f"{tuple(z_a.shape)} and {tuple(z_b.shape)}")
    require(z_a.shape[0] >= 1 and z_a.shape[1] >= 1, OP,
            lambda: f"need at least one row and one feature, got {tuple(z_a.shape)}")
    allowed = FLOAT_DTYPES if impl == "triton" else FLOAT_DTYPES + (torch.float64,)
    require_dtype(z_a, "z_a", OP, allowed)
    require(z_a.dtype == z_b.dtype, OP,
            lambda: f"z_a and z_b must share a dtype, got {z_a.dtype} and {z_b.dtype}")
    require_same_device(OP, z_a=z_a, z_b=z_b)
    require(isinstance(temperature, numbers.Real) and not isinstance(temperature, bool), OP,
            lambda: "temperature must be a host number (a Python or NumPy float, not a tensor), "
            f"got {type(temperature).__name__}")
    require(math.isfinite(temperature) and temperature > 0, OP,
            lambda: f"temperature must be positive and finite, got {temperature!r}")
    # fp32 logits of size 1/temperature keep ~7 digits: far below the documented range the
    # similarities' differences are lost, and near 1e-38 the loss overflows to inf/NaN.
    require(temperature >= MIN_TEMPERATURE, OP,
            lambda: f"temperature must be at least {MIN_TEMPERATURE:g} (fp32 logits of "
            f"1/temperature lose the similarities below it), got {temperature!r}")
    require(isinstance(symmetric, bool), OP,
            lambda: f"symmetric must be True or False, got {symmetric!r}")
    require(negatives in NEGATIVES, OP,
            lambda: f"negatives must be one of {NEGATIVES}, got {negatives!r}")


def _loss(z_a, z_b, temperature, symmetric, negatives, gather_distributed, impl, chunk=0,
          groups=None):
    """The loss from the statistics ops; ``chunk`` (columns per block of the torch path, 0 for
    the default) is for tests."""
    scale = 1.0 / float(temperature)
    m = z_a.shape[0]
    world, rank = _world() if gather_distributed else (1, 0)
    gather = all_gather_with_grad if world > 1 else (lambda x: x)

    def stats(zq, zk, key_offset, pos_shift, pos_mod, self_mask, col_lse, gq, gk):
        return _fwd(zq, zk, scale, key_offset, pos_shift, pos_mod, self_mask, col_lse, gq, gk,
                    chunk, impl)

    if groups is not None:
        groups = groups.to(torch.int64).contiguous()
    if negatives == "cross":
        if not gather_distributed:
            # One pass gives both directions: the column LSE is the b -> a direction (the
            # groups' exclusions are symmetric, so its candidates are the right ones too).
            row, pos, col, _, _ = stats(z_a, z_b, 0, 0, m, False, symmetric, groups, groups)
            loss = 0.5 * (row.mean() + col.mean()) - pos.mean() if symmetric else (row - pos).mean()
        else:
            # Local queries against every rank's keys; the positive of local row i is global
            # key rank*M + i. The b -> a direction needs the other view gathered too.
            all_groups = None if groups is None else gather(groups)
            row, pos, _, _, _ = stats(z_a, gather(z_b), rank * m, 0, m, False, False,
                                      groups, all_groups)
            loss = (row - pos).mean()
            if symmetric:
                row, pos, _, _, _ = stats(z_b, gather(z_a), rank * m, 0, m, False, False,
                                          groups, all_groups)
                loss = 0.5 * (loss + (row - pos).mean())
    else:
        # NT-Xent: rows [a; b] are queries and keys; the positive of row i is row (i + M) % 2M
        # of the same rank's block of 2M keys, and its own row is masked out.
        z = torch.cat([z_a, z_b])
        keys = gather(z)
        queries = z if symmetric else z[:m]
        ids = key_ids = None
        if groups is not None:
            ids = torch.cat([groups, groups])
            key_ids = gather(ids)
            ids = ids if symmetric else groups
        row, pos, _, _, _ = stats(queries, keys, rank * 2 * m, m, 2 * m, True, False, ids,
                                  key_ids)
        loss = (row - pos).mean()
    return loss.to(z_a.dtype)


def info_nce(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    symmetric: bool = True,
    negatives: str = "cross",
    gather_distributed: bool = False,
    impl: str = "auto",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of the positive pairs ``(z_a[i], z_b[i])``, without an (M, M) matrix.

    The logits are cosine similarities over ``temperature``: ``L[i, j] = <a_i, b_j> / tau`` with
    ``a = z_a / |z_a|``, ``b = z_b / |z_b|`` (``F.normalize``). The Triton path computes them tile
    by tile in fp32 and keeps fp32 log-sum-exps (row and column ones from one pass); its
    backward either keeps ``dloss/dlogits`` for a bounded chunk of rows or, at widths whose
    rows fit in registers, recomputes the logits on the query and on the key side, whichever
    the cost model bounds lower for the call (``spcl_fast.kernels.info_nce``); the PyTorch path
    recomputes over column blocks (``O(M * chunk)`` memory).

    Args:
        z_a, z_b: ``(M, d)`` float16, bfloat16 or float32 (float64 with ``impl="torch"``; the
            Triton path multiplies float32 in TF32, ``impl="torch"`` in IEEE fp32), same
            shape, dtype and device; ``M >= 1``, any ``d >= 1`` (the kernels pad ``d`` to a
            multiple of 16, a copy of the inputs where it is not one). Row ``i`` of ``z_a``
            and row ``i`` of ``z_b`` are two views of one sample.
        temperature: softmax temperature ``tau >= 1e-4`` (host float); accurate down to ``0.01``.
        symmetric: average the ``a -> b`` and ``b -> a`` directions (CLIP); else ``a -> b`` only.
        negatives: ``"cross"``: each query's candidates are the other view's rows (CLIP);
            ``"all"``: SimCLR's NT-Xent over the ``2M`` rows of both views, self excluded
            (with ``symmetric`` every one of the ``2M`` rows is a query, else only ``z_a``'s).
        gather_distributed: inside an initialised ``torch.distributed`` group of ``W`` ranks,
            all-gather the other view (both views for ``symmetric`` or ``"all"``) with gradient,
            so every local query sees the ``W * M`` global rows as candidates; local row ``i`` is
            global row ``rank * M + i``. Every rank must pass the same ``M``. The result is the
            mean over the *local* queries; the backward sums the gathered rows' gradients over
            ranks, so after DDP averages parameter gradients they equal those of one process
            computing the loss on the whole batch. Raises ``RuntimeError`` without a group.
        impl: ``"auto"`` (Triton on CUDA, PyTorch otherwise; env ``SPCL_FAST_IMPL`` overrides),
            ``"triton"`` or ``"torch"``.
        groups: optional ``(M,)`` integer ids on ``z_a``'s device, one per pair (e.g. the
            patient of each film): two rows whose ids are equal are no negatives of each other
            (in both views, and with ``"all"`` within a view), the positive pair always stays.
            A row whose group holds every row keeps only its positive: its term is 0 with zero
            gradient. With ``gather_distributed`` the ids are gathered with the rows, so they
            must mean the same on every rank (global ids, not per-rank indices).

    Returns:
        A scalar tensor in the input dtype (computed in fp32, fp64 for fp64 inputs, then cast),
        differentiable in ``z_a`` and ``z_b``; gradients come back in the input dtype.

    Example::

        >>> from spcl_fast import info_nce
        >>> z_a = torch.randn(8, 32, requires_grad=True)
        >>> z_b = torch.randn(8, 32, requires_grad=True)
        >>> loss = info_nce(z_a, z_b, temperature=0.1)
        >>> loss.shape
        torch.Size([])
        >>> loss.backward()
        >>> z_a.grad.shape
        torch.Size([8, 32])
    """
    impl = resolve_impl(impl, z_a, OP)
    _validate(z_a, z_b, temperature, symmetric, negatives, impl)
    _validate_groups(groups, z_a)
    return _loss(z_a, z_b, temperature, symmetric, negatives, gather_distributed, impl,
                 groups=groups)
