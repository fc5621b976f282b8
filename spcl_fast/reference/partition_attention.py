"""Pure-PyTorch partition attention: the ground truth for tests and the CPU fallback.

Two implementations of the same maths, non-causal softmax attention inside each segment:

* :func:`partition_attention_ref` — dense block-diagonal attention over the packed rows,
  differentiable by autograd. Simple enough to trust; O(T^2) memory, so tests only.
* :func:`partition_attention_torch_fwd` / :func:`partition_attention_torch_bwd` — the fallback
  the op runs on CPU (or when asked for ``impl="torch"``): segments are padded to
  ``max_seqlen`` and batched, and the backward recomputes probabilities from the saved
  log-sum-exp exactly as a flash-attention kernel does. Same signatures and outputs as the
  Triton launchers in ``spcl_fast.kernels.partition_attention``.

:func:`partition_attention_qkvpacked_torch_fwd` / :func:`partition_attention_qkvpacked_torch_bwd`
are the same pair on one ``(R, 3, H, Dh)`` qkv tensor, the backward returning one ``(R, 3, H, Dh)``
gradient.

Shapes: ``q, k, v`` are ``(R, H, Dh)``; ``cu_seqlens`` ``(S+1,)`` int32; ``token_index`` ``(T,)``
int64 rows of ``q/k/v`` in segment order, or ``None`` when the rows are already packed
(``R == T``). Outputs are ``(R, H, Dh)`` with zeros in rows that belong to no segment; the
log-sum-exp is ``(H, T)`` in packed order, fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _packed_rows(q: torch.Tensor, token_index: torch.Tensor | None) -> torch.Tensor:
    return torch.arange(q.shape[0], device=q.device) if token_index is None else token_index


def partition_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    token_index: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Block-diagonal attention on the packed rows; returns ``(R, H, Dh)`` in ``q.dtype``.

    With ``upcast`` the maths runs in fp32 (fp64 stays fp64), as the kernels do; without it the
    maths runs in the input dtype, which is what docs/architecture.md §5 calls ``ref_lp``.

    Args:
        q, k, v: ``(R, H, Dh)`` float, any float dtype.
        cu_seqlens: ``(S+1,)`` int32 (or int64) segment offsets into the packed order.
        token_index: ``(T,)`` int64 rows of ``q/k/v`` in segment order, or ``None`` when the
            rows are already packed (``R == T``).
        softmax_scale: scale of ``q k^T``; default ``Dh ** -0.5``.
        upcast: compute in fp32 (fp64 for fp64 inputs) instead of the input dtype.

    Returns:
        ``(R, H, Dh)`` in ``q.dtype``, zeros in rows of no segment; differentiable (autograd).

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = torch.randn(3, 8, 2, 4, generator=g).unbind(0)  # R = 8, H = 2, Dh = 4
        >>> cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)  # segments of 3 and 5 rows
        >>> out = partition_attention_ref(q, k, v, cu_seqlens)
        >>> out.shape, out.dtype
        (torch.Size([8, 2, 4]), torch.float32)
        >>> first = partition_attention_ref(q[:3], k[:3], v[:3], cu_seqlens[:2])
        >>> torch.allclose(out[:3], first)  # a segment never sees another
        True
        >>> token_index = torch.tensor([5, 0, 2, 7])  # in place: rows 1, 3, 4, 6 in no segment
        >>> out = partition_attention_ref(q, k, v, torch.tensor([0, 2, 4]), token_index)
        >>> out[[1, 3, 4, 6]].abs().sum().item()
        0.0
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    rows = _packed_rows(q, token_index)
    dtype = _compute_dtype(q.dtype) if upcast else q.dtype
    qp, kp, vp = (t[rows].to(dtype).transpose(0, 1) for t in (q, k, v))  # (H, T, Dh)
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(seqlens.numel(), device=q.device), seqlens)
    scores = (qp @ kp.transpose(1, 2)) * scale
    scores = scores.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    out_packed = (scores.softmax(dim=-1) @ vp).transpose(0, 1).to(q.dtype)
    out = q.new_zeros(q.shape)
    return out.index_copy(0, rows, out_packed)


class _Padded:
    """Maps packed positions to a padded ``(S, max_seqlen)`` grid without host syncs."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, rows: torch.Tensor):
        total = rows.numel()
        self.num_segments = cu_seqlens.numel() - 1
        self.max_seqlen = max(int(max_seqlen), 1)
        t = torch.arange(total, device=rows.device)
        cu = cu_seqlens.long()
        self.seg = torch.searchsorted(cu[1:], t, right=True)
        self.pos = t - cu[self.seg]
        self.rows = rows
        self.valid = torch.zeros(
            self.num_segments, self.max_seqlen, dtype=torch.bool, device=rows.device
        )
        self.valid[self.seg, self.pos] = True

    def gather(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(R, H, Dh)`` rows -> ``(S, H, L, Dh)``, zeros in padding."""
        padded = x.new_zeros(self.num_segments, self.max_seqlen, *x.shape[1:], dtype=dtype)
        padded[self.seg, self.pos] = x[self.rows].to(dtype)
        return padded.transpose(1, 2)

    def scatter(self, padded: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
        """``(S, H, L, Dh)`` -> ``(R, H, Dh)`` rows, zeros in rows of no segment."""
        packed = padded.transpose(1, 2)[self.seg, self.pos].to(dtype)
        out = packed.new_zeros(num_rows, *packed.shape[1:])
        return out.index_copy(0, self.rows, packed)

    def probabilities(self, q, k, lse, scale):
        scores = (q @ k.transpose(-1, -2)) * scale
        key_valid = self.valid[:, None, None, :]
        return torch.where(key_valid, torch.exp(scores - lse[..., None]), 0.0)

    def lse_packed(self, lse: torch.Tensor) -> torch.Tensor:
        """``(S, H, L)`` -> ``(H, T)``."""
        return lse.transpose(1, 2)[self.seg, self.pos].transpose(0, 1).contiguous()

    def lse_padded(self, lse: torch.Tensor) -> torch.Tensor:
        """``(H, T)`` -> ``(S, H, L)``; padding rows get 0 so their probabilities vanish."""
        padded = lse.new_zeros(self.num_segments, self.max_seqlen, lse.shape[0])
        padded[self.seg, self.pos] = lse.transpose(0, 1)
        return padded.transpose(1, 2)


def partition_attention_torch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded-batch forward; returns ``(out (R, H, Dh), lse (H, T))``.

    Args:
        q, k, v: ``(R, H, Dh)`` float.
        cu_seqlens: ``(S+1,)`` int32 segment offsets into the packed order.
        max_seqlen: longest segment, a host int (the padded length).
        token_index: ``(T,)`` int64 rows in segment order, or ``None`` (packed, ``R == T``).
        softmax_scale: scale of ``q k^T`` (no default, as in the Triton launcher).

    Returns:
        ``out`` ``(R, H, Dh)`` in ``q.dtype`` (zeros in rows of no segment) and the
        log-sum-exp of each packed query row ``(H, T)``, fp32 (fp64 for fp64 inputs).

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = torch.randn(3, 8, 2, 4, generator=g).unbind(0)
        >>> cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
        >>> out, lse = partition_attention_torch_fwd(q, k, v, cu_seqlens, 5, None, 4 ** -0.5)
        >>> out.shape, lse.shape, lse.dtype
        (torch.Size([8, 2, 4]), torch.Size([2, 8]), torch.float32)
        >>> torch.allclose(out, partition_attention_ref(q, k, v, cu_seqlens), atol=1e-6)
        True
    """
    dtype = _compute_dtype(q.dtype)
    pad = _Padded(cu_seqlens, max_seqlen, _packed_rows(q, token_index))
    qp, kp, vp = (pad.gather(t, dtype) for t in (q, k, v))
    scores = (qp @ kp.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~pad.valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (S, H, L); -inf only in padding query rows
    probs = torch.exp(scores - torch.where(pad.valid[:, None, :], lse, 0.0)[..., None])
    out = pad.scatter(probs @ vp, q.shape[0], q.dtype)
    return out, pad.lse_packed(lse)


def partition_attention_torch_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward from the saved ``lse``; returns ``(dq, dk, dv)``, each ``(R, H, Dh)``.

    Args:
        dout: ``(R, H, Dh)`` gradient of ``out``.
        q, k, v, cu_seqlens, max_seqlen, token_index, softmax_scale: as given to
            :func:`partition_attention_torch_fwd`.
        out, lse: its outputs, ``(R, H, Dh)`` and ``(H, T)``.

    Returns:
        ``(dq, dk, dv)``, each ``(R, H, Dh)`` in ``q.dtype``, zeros in rows of no segment.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = torch.randn(3, 8, 2, 4, generator=g).unbind(0)
        >>> cu_seqlens, scale = torch.tensor([0, 3, 8], dtype=torch.int32), 4 ** -0.5
        >>> out, lse = partition_attention_torch_fwd(q, k, v, cu_seqlens, 5, None, scale)
        >>> grads = partition_attention_torch_bwd(torch.ones_like(out), q, k, v, out, lse,
        ...                                       cu_seqlens, 5, None, scale)
        >>> leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        >>> partition_attention_ref(*leaves, cu_seqlens).sum().backward()
        >>> all(torch.allclose(t.grad, d, atol=1e-5) for t, d in zip(leaves, grads))
        True
    """
    dtype = _compute_dtype(q.dtype)
    pad = _Padded(cu_seqlens, max_seqlen, _packed_rows(q, token_index))
    qp, kp, vp, op, dop = (pad.gather(t, dtype) for t in (q, k, v, out, dout))
    probs = pad.probabilities(qp, kp, pad.lse_padded(lse.to(dtype)), softmax_scale)
    delta = (dop * op).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
    dv = probs.transpose(-1, -2) @ dop
    dscores = probs * (dop @ vp.transpose(-1, -2) - delta)
    dq = (dscores @ kp) * softmax_scale
    dk = (dscores.transpose(-1, -2) @ qp) * softmax_scale
    rows = q.shape[0]
    return (
        pad.scatter(dq, rows, q.dtype),
        pad.scatter(dk, rows, q.dtype),
        pad.scatter(dv, rows, q.dtype),
    )


def partition_attention_qkvpacked_torch_fwd(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partition_attention_torch_fwd` of the q, k, v in ``qkv`` ``(R, 3, H, Dh)``."""
    q, k, v = qkv.unbind(1)
    return partition_attention_torch_fwd(q, k, v, cu_seqlens, max_seqlen, token_index,
                                         softmax_scale)


def partition_attention_qkvpacked_torch_bwd(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """Backward of :func:`partition_attention_qkvpacked_torch_fwd`: ``d(qkv)`` ``(R, 3, H, Dh)``,
    zeros in rows of no segment."""
    q, k, v = qkv.unbind(1)
    grads = partition_attention_torch_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                          token_index, softmax_scale)
    return torch.stack(grads, dim=1)
