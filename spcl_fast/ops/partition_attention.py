"""``partition_attention``: varlen attention inside segments, with an optional fused gather.

Layers (as in flash-attention): the Triton launchers in ``spcl_fast.kernels.partition_attention``
and the PyTorch fallback in ``spcl_fast.reference`` share one signature; ``torch.library``
custom ops (forward, backward) dispatch between them, so ``torch.compile`` traces the op as one
node and ``FlopCounterMode`` counts it with the formula of ``spcl_fast.flops``; the autograd
formula is registered on the forward op; :func:`partition_attention` validates and documents.
:func:`partition_attention_qkvpacked` is the same op on one ``(R, 3, H, Dh)`` qkv tensor (its own
pair of custom ops), whose backward writes one ``(R, 3, H, Dh)`` gradient instead of three
tensors that autograd would stack.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import flops
from .._impl import resolve_impl
from ..reference.partition_attention import (
    partition_attention_qkvpacked_torch_bwd,
    partition_attention_qkvpacked_torch_fwd,
    partition_attention_torch_bwd,
    partition_attention_torch_fwd,
)
from ._checks import (
    FLOAT_DTYPES,
    check_values,
    require,
    require_dtype,
    require_same_device,
)

OP = "partition_attention"


def _launchers(impl: str, packed: bool = False):
    """(forward, backward) of the Triton launchers or the PyTorch fallback; ``packed``: the
    qkv-packed pair."""
    if impl == "triton":
        from ..kernels import partition_attention as kernels

        if packed:
            return (kernels.partition_attention_qkvpacked_fwd,
                    kernels.partition_attention_qkvpacked_bwd)
        return kernels.partition_attention_fwd, kernels.partition_attention_bwd
    if packed:
        return partition_attention_qkvpacked_torch_fwd, partition_attention_qkvpacked_torch_bwd
    return partition_attention_torch_fwd, partition_attention_torch_bwd


@torch.library.custom_op("spcl_fast::partition_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    token_index: torch.Tensor | None,
    max_seqlen: int,
    softmax_scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fwd, _ = _launchers(impl)
    return fwd(q, k, v, cu_seqlens, max_seqlen, token_index, softmax_scale)


def _fake_outputs(q, token_index):
    """Fake (out, lse) of a forward whose q is ``(R, H, Dh)``."""
    total = q.shape[0] if token_index is None else token_index.shape[0]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((q.shape[1], total), dtype=lse_dtype)


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, token_index, max_seqlen, softmax_scale, impl):
    return _fake_outputs(q, token_index)


@torch.library.custom_op("spcl_fast::partition_attention_bwd", mutates_args=())
def _bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    token_index: torch.Tensor | None,
    max_seqlen: int,
    softmax_scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, bwd = _launchers(impl)
    return bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, token_index, softmax_scale)


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens, token_index, max_seqlen, softmax_scale, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, token_index, max_seqlen, softmax_scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, token_index)
    ctx.max_seqlen, ctx.softmax_scale, ctx.impl = max_seqlen, softmax_scale, impl


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, token_index = ctx.saved_tensors
    dq, dk, dv = _bwd(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        token_index,
        ctx.max_seqlen,
        ctx.softmax_scale,
        ctx.impl,
    )
    return dq, dk, dv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("spcl_fast::partition_attention_qkvpacked_fwd", mutates_args=())
def _packed_fwd(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    token_index: torch.Tensor | None,
    max_seqlen: int,
    softmax_scale: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fwd, _ = _launchers(impl, packed=True)
    return fwd(qkv, cu_seqlens, max_seqlen, token_index, softmax_scale)


@_packed_fwd.register_fake
def _packed_fwd_fake(qkv, cu_seqlens, token_index, max_seqlen, softmax_scale, impl):
    return _fake_outputs(qkv[:, 0], token_index)


@torch.library.custom_op("spcl_fast::partition_attention_qkvpacked_bwd", mutates_args=())
def _packed_bwd(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    token_index: torch.Tensor | None,
    max_seqlen: int,
    softmax_scale: float,
    impl: str,
) -> torch.Tensor:
    _, bwd = _launchers(impl, packed=True)
    return bwd(dout, qkv, out, lse, cu_seqlens, max_seqlen, token_index, softmax_scale)


@_packed_bwd.register_fake
def _packed_bwd_fake(dout, qkv, out, lse, cu_seqlens, token_index, max_seqlen, softmax_scale,
                     impl):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, token_index, max_seqlen, softmax_scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens, token_index)
    ctx.max_seqlen, ctx.softmax_scale, ctx.impl = max_seqlen, softmax_scale, impl


def _packed_backward(ctx, dout, dlse):
    qkv, out, lse, cu_seqlens, token_index = ctx.saved_tensors
    dqkv = _packed_bwd(dout.contiguous(), qkv, out, lse, cu_seqlens, token_index, ctx.max_seqlen,
                       ctx.softmax_scale, ctx.impl)
    return dqkv, None, None, None, None, None


_packed_fwd.register_autograd(_packed_backward, setup_context=_packed_setup_context)


def _segment_lengths(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> list[int]:
    """Segment lengths for FLOP counting (reads device memory: counting is a measurement)."""
    if cu_seqlens.device.type == "meta" or isinstance(cu_seqlens, torch._subclasses.FakeTensor):
        # No values under tracing: bound by every row attending to max_seqlen keys.
        return [max_seqlen] * (total // max(max_seqlen, 1))
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


@register_flop_formula(torch.ops.spcl_fast.partition_attention_fwd, get_raw=True)
def _fwd_flops(q, k, v, cu_seqlens, token_index, max_seqlen, *args, out_val=None, **kwargs):
    total = q.shape[0] if token_index is None else token_index.shape[0]
    lengths = _segment_lengths(cu_seqlens, total, max_seqlen)
    return flops.attention_flops(lengths, q.shape[1], q.shape[2])


@register_flop_formula(torch.ops.spcl_fast.partition_attention_bwd, get_raw=True)
def _bwd_flops(
    dout, q, k, v, out, lse, cu_seqlens, token_index, max_seqlen, *args, out_val=None, **kwargs
):
    lengths = _segment_lengths(cu_seqlens, lse.shape[1], max_seqlen)
    return flops.attention_bwd_flops(lengths, q.shape[1], q.shape[2])


@register_flop_formula(torch.ops.spcl_fast.partition_attention_qkvpacked_fwd, get_raw=True)
def _packed_fwd_flops(qkv, cu_seqlens, token_index, max_seqlen, *args, out_val=None, **kwargs):
    q = qkv[:, 0]
    return _fwd_flops(q, q, q, cu_seqlens, token_index, max_seqlen)


@register_flop_formula(torch.ops.spcl_fast.partition_attention_qkvpacked_bwd, get_raw=True)
def _packed_bwd_flops(dout, qkv, out, lse, cu_seqlens, token_index, max_seqlen, *args,
                      out_val=None, **kwargs):
    lengths = _segment_lengths(cu_seqlens, lse.shape[1], max_seqlen)
    return flops.attention_bwd_flops(lengths, qkv.shape[2], qkv.shape[3])


TRITON_HEAD_DIMS = (16, 128)  # head dims the kernel's tiles cover; "auto" uses PyTorch outside


def _validate(q, k, v, cu_seqlens, max_seqlen, token_index, impl) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(
                f"{OP}: {name} must be a (rows, heads, head_dim) tensor, got "
                f"{getattr(t, 'shape', type(t))}"
            )
        if t.stride(-1) != 1:
            raise ValueError(
                f"{OP}: {name} must have unit stride on head_dim, got strides "
                f"{t.stride()} (call .contiguous() or slice a packed qkv tensor)"
            )
    require(
        q.shape == k.shape == v.shape,
        OP,
        lambda: f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
        f"{tuple(v.shape)}",
    )
    if impl == "triton":
        head_dim = q.shape[-1]
        lo, hi = TRITON_HEAD_DIMS
        require(
            lo <= head_dim <= hi,
            OP,
            lambda: f"impl='triton' supports head_dim (Dh) from {lo} to {hi}, got Dh={head_dim} "
            f"(impl='auto' or 'torch' runs other head dims in PyTorch)",
        )
    allowed = FLOAT_DTYPES if impl == "triton" else FLOAT_DTYPES + (torch.float64,)
    require_dtype(q, "q", OP, allowed)
    require(
        q.dtype == k.dtype == v.dtype,
        OP,
        lambda: f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
    )
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{OP}: cu_seqlens must be a 1-D tensor of num_segments + 1 >= 2 offsets")
    require_dtype(cu_seqlens, "cu_seqlens", OP, (torch.int32,))
    require(
        isinstance(max_seqlen, int) and max_seqlen >= 0,
        OP,
        lambda: f"max_seqlen must be a non-negative host int, got {max_seqlen!r}",
    )
    tensors = {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens}
    if token_index is not None:
        require(
            isinstance(token_index, torch.Tensor) and token_index.dim() == 1,
            OP,
            "token_index must be a 1-D tensor of row indices",
        )
        require_dtype(token_index, "token_index", OP, (torch.int64,))
        tensors["token_index"] = token_index
    require_same_device(OP, **tensors)
    if check_values(q):
        _validate_segments(q.shape[0], cu_seqlens, max_seqlen, token_index)


def _validate_segments(rows, cu_seqlens, max_seqlen, token_index) -> None:
    """The checks that read values (host syncs): offsets, lengths and row indices."""
    total = rows if token_index is None else token_index.numel()
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    require(cu[0] == 0, OP, lambda: f"cu_seqlens must start at 0, got {cu[0]}")
    require(min(lengths) >= 0, OP, "cu_seqlens must be non-decreasing")
    require(
        cu[-1] == total,
        OP,
        lambda: f"cu_seqlens[-1] = {cu[-1]} must equal the number of "
        f"{'token_index entries' if token_index is not None else 'rows of q'} ({total})",
    )
    require(
        max(lengths) <= max_seqlen,
        OP,
        lambda: f"max_seqlen = {max_seqlen} is smaller than the longest segment ({max(lengths)})",
    )
    if token_index is not None and total > 0:
        lo, hi = int(token_index.min()), int(token_index.max())
        require(
            lo >= 0 and hi < rows,
            OP,
            lambda: f"token_index values must lie in [0, {rows}), got min {lo}, max {hi}",
        )
        require(
            token_index.unique().numel() == total,
            OP,
            "token_index must not repeat a row (each row belongs to at most one segment)",
        )


def partition_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Non-causal softmax attention inside each segment, with the token gather fused in.

    Segment ``s`` is rows ``cu_seqlens[s]:cu_seqlens[s+1]`` of the packed token order, exactly
    as in ``flash_attn_varlen_func``; a token attends to every token of its own segment and no
    other.

    Args:
        q, k, v: ``(R, H, Dh)`` float16, bfloat16 or float32 (float64 with ``impl="torch"``;
            the Triton path multiplies float32 in TF32, ``impl="torch"`` in IEEE fp32);
            any strides with unit stride on ``Dh`` (the three views of one ``(R, 3, H, Dh)``
            qkv tensor are fine).
        cu_seqlens: ``(S + 1,)`` int32 on q's device: segment offsets into the packed order,
            starting at 0, non-decreasing, ending at the number of packed rows. Empty segments
            and segments of one token are allowed.
        max_seqlen: longest segment as a host int (no device sync inside the op). On the Triton
            path it sizes the grid and picks the backward: one program per (segment, head)
            when ``max_seqlen`` fits the one-pass tile (``onepass_tile`` in
            ``spcl_fast.kernels.partition_attention``), else the two-kernel backward. Below
            the longest segment it is an error where values are checked (CPU tensors, or
            ``SPCL_FAST_CHECKS=1``); unchecked on CUDA the kernels still compute every row.
        token_index: ``None`` for the packed layout (``R`` packed rows). Otherwise ``(T,)``
            int64: packed row ``t`` is row ``token_index[t]`` of ``q/k/v`` (the in-place layout
            of a ``(B*N)``-row tensor, or any row tensor such as ``B*N`` patch rows followed by
            one class-token row per segment; rows are gathered inside the kernel and outputs
            written back to them; rows in no segment get zeros). Rows must not repeat and need
            not be sorted.
        softmax_scale: scale of ``q k^T`` before the softmax; default ``Dh ** -0.5``.
        impl: ``"auto"`` (Triton on CUDA for head dims 16 to 128, PyTorch otherwise; env
            ``SPCL_FAST_IMPL`` overrides),
            ``"triton"`` or ``"torch"``.

    Returns:
        ``(R, H, Dh)`` in q's dtype. Differentiable in q, k and v.

    Example::

        >>> from spcl_fast import partition_attention, sample_partitions
        >>> B, N, H, Dh = 2, 16, 4, 32
        >>> plan = sample_partitions(B, N, generator=torch.Generator().manual_seed(0))
        >>> qkv = torch.randn(B * N, 3, H, Dh, requires_grad=True)
        >>> q, k, v = qkv.unbind(1)
        >>> out = partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen,
        ...                           token_index=plan.token_index)
        >>> out.shape
        torch.Size([32, 4, 32])
        >>> out.sum().backward()
    """
    impl = _resolve(q, impl)
    _validate(q, k, v, cu_seqlens, max_seqlen, token_index, impl)
    out, _ = _fwd(q, k, v, cu_seqlens, token_index, max_seqlen, _scale(q, softmax_scale), impl)
    return out


def _resolve(q, impl: str) -> str:
    lo, hi = TRITON_HEAD_DIMS
    fits = not isinstance(q, torch.Tensor) or lo <= q.shape[-1] <= hi
    return resolve_impl(impl, q, OP, triton_fits=fits)


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    require(q.shape[-1] >= 1, OP, "head_dim (Dh) must be at least 1")
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    require(math.isfinite(scale) and scale > 0, OP,
            lambda: f"softmax_scale must be positive and finite, got {scale}")
    return scale


def partition_attention_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`partition_attention` of one ``(R, 3, H, Dh)`` qkv tensor (q, k, v along dim 1,
    as a ViT's ``qkv`` projection viewed ``(R, 3, H, Dh)`` holds them).

    The same maths, arguments and result as ``partition_attention(*qkv.unbind(1), ...)``; the
    difference is the backward: it writes the gradient of ``qkv`` as one ``(R, 3, H, Dh)``
    buffer (zeros in rows of no segment), where three separate q, k, v gradients would be
    stacked by autograd afterwards (one more read and write of the whole gradient).

    Args:
        qkv: ``(R, 3, H, Dh)`` float16, bfloat16 or float32 (float64 with ``impl="torch"``),
            unit stride on ``Dh``.
        cu_seqlens, max_seqlen, token_index, softmax_scale, impl: as for
            :func:`partition_attention`.

    Returns:
        ``(R, H, Dh)`` in qkv's dtype. Differentiable in ``qkv``.

    Example::

        >>> from spcl_fast import partition_attention_qkvpacked, sample_partitions
        >>> plan = sample_partitions(2, 16, generator=torch.Generator().manual_seed(0))
        >>> qkv = torch.randn(2 * 16, 3, 4, 32, requires_grad=True)
        >>> out = partition_attention_qkvpacked(qkv, plan.cu_seqlens, plan.max_seqlen,
        ...                                     token_index=plan.token_index)
        >>> out.shape
        torch.Size([32, 4, 32])
        >>> out.sum().backward()
        >>> qkv.grad.shape
        torch.Size([32, 3, 4, 32])
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"{OP}: qkv must be a (rows, 3, heads, head_dim) tensor, got "
                         f"{getattr(qkv, 'shape', type(qkv))}")
    q, k, v = qkv.unbind(1)
    impl = _resolve(q, impl)
    _validate(q, k, v, cu_seqlens, max_seqlen, token_index, impl)
    scale = _scale(q, softmax_scale)
    out, _ = _packed_fwd(qkv, cu_seqlens, token_index, max_seqlen, scale, impl)
    return out
