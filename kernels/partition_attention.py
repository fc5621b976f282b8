"""Partition attention in Triton: varlen FlashAttention with the token gather fused into the loads.

Segment ``s`` is packed positions ``cu_seqlens[s]:cu_seqlens[s+1]``. Packed position ``t`` lives in
row ``t`` of ``q/k/v`` (packed layout, ``token_index=None``) or in row ``token_index[t]`` (in-place
layout): every kernel turns packed positions into rows with :func:`_rows` right before a load or a
store, so the gather and the scatter cost one extra int64 load per block and no copy.

Kernels (one program per block of one segment and one head, grid ``(blocks, heads, segments)``;
blocks past a segment's end exit; block sizes autotuned per head dim, max_seqlen bucket, layout
and dtype; dots in the precision of ``_common.DOT_PRECISION``):

* ``_fwd_kernel``: a query block against all key blocks of its segment, online softmax in fp32
  with ``exp2`` (``log2(e)`` folded into the score scale); writes ``out`` and ``lse`` (natural
  log, fp32, ``(H, T)`` in packed order, the same contract as the PyTorch fallback).
* ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` per packed position.
* ``_bwd_dkdv_kernel``: a key block holds ``dK, dV`` in registers and loops over the query blocks
  of its segment; ``_bwd_dq_kernel``: a query block holds ``dQ`` and loops over the key blocks.
  Each gradient row is written by exactly one program, so there are no atomics and the results
  are bitwise reproducible.

Launchers have the signatures of ``spcl_fast.reference.partition_attention``'s torch fallback;
validation lives in ``spcl_fast.ops.partition_attention``. Rows of ``q`` in no segment (possible
only when ``token_index`` has fewer entries than ``q`` has rows) get zeros: those outputs are
allocated with ``torch.zeros``, every other output with ``torch.empty``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, INTERPRET, configs, launch, new_output, tuned

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E)

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128

# Autotuning candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages, the head blocks BLOCK_D it
# takes without register spills or shared-memory overflow for 16-bit and for fp32 operands).
# The blocks are what the aot tier measures on sm_80 and sm_90 (tests/test_aot.py, README
# "Kernels on GPU targets"; head dim 16 is taken where 32 passes), with Triton 3.9 and 3.6;
# pruning drops a candidate at other blocks, so every shipped choice is spill-free.
_ALL, _UPTO64 = (16, 32, 64, 128), (16, 32, 64)
_FWD = (
    (128, 64, 8, 3, _ALL, (16, 32)),
    (64, 64, 8, 3, _ALL, (64,)),
    (128, 128, 8, 2, _UPTO64, (16, 32)),
    (64, 32, 4, 4, _ALL, _UPTO64),
    (128, 32, 8, 3, _ALL, _ALL),
)
_DKDV = (
    (32, 128, 8, 3, _UPTO64, (16, 32)),
    (32, 64, 4, 3, _UPTO64, (16, 32)),
    (16, 64, 4, 3, _ALL, _UPTO64),
    (32, 32, 4, 3, (128,), (64, 128)),
)
_DQ = (
    (64, 32, 4, 3, _ALL, (16, 32)),
    (64, 64, 4, 2, _UPTO64, (16, 32)),
    (128, 32, 8, 3, _ALL, (16, 32)),
    (64, 32, 8, 3, _ALL, _ALL),
)
_PRE_BLOCK = 16 if INTERPRET else 64


def _autotune(table):
    """``triton.autotune`` over a candidate table, keyed on head dim, max_seqlen bucket and
    layout (the autotuner adds the tensors' dtypes), pruned to the candidates that fit."""
    blocks = {(m, n, w, s): (lowp, fp32) for m, n, w, s, lowp, fp32 in table}

    def prune(candidates, named_args, **kwargs):
        fp32 = named_args["Q"].dtype == torch.float32

        def fits(c):
            key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            return key not in blocks or kwargs["BLOCK_D"] in blocks[key][fp32]  # interpreter's

        return tuned([c for c in candidates if fits(c)])

    tuned_configs = configs([({"BLOCK_M": m, "BLOCK_N": n}, w, s) for m, n, w, s, *_ in table],
                            {"BLOCK_M": 16, "BLOCK_N": 16})
    return triton.autotune(configs=tuned_configs, key=["HEAD_DIM", "SEQ_BUCKET", "HAS_INDEX"],
                           prune_configs_by={"early_config_prune": prune})


@triton.jit
def _rows(token_index, seq_start, offs, mask, HAS_INDEX: tl.constexpr):
    """Rows of q/k/v (int64) holding packed positions ``seq_start + offs``: the fused gather."""
    rows = seq_start + offs.to(tl.int64)
    if HAS_INDEX:
        rows = tl.load(token_index + rows, mask=mask, other=0)
    return rows


@triton.jit
def _segment(cu_seqlens):
    """(segment start as int64, segment length, head) of this program.

    The grid is (blocks, heads, segments): the block index is the fastest axis, so the programs
    of one (segment, head) run together and share its K/V in L2 (the tutorial's and FA2's order).
    """
    seg = tl.program_id(2)
    start = tl.load(cu_seqlens + seg)
    seqlen = tl.load(cu_seqlens + seg + 1) - start
    return start.to(tl.int64), seqlen, tl.program_id(1).to(tl.int64)


@_autotune(_FWD)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens, token_index,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_or, stride_oh,
    stride_lh, HEAD_DIM: tl.constexpr, qk_scale,
    SEQ_BUCKET,  # autotuning key only
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq_start, seqlen, head = _segment(cu_seqlens)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seqlen:  # the grid is sized for max_seqlen; shorter segments stop here
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    # BLOCK_D is HEAD_DIM padded to a power of two. HEAD_DIM is a constexpr so the compiler
    # sees the mask is constant over runs of 8+ lanes and keeps 16-byte (async) loads.
    mask_d = offs_d < HEAD_DIM
    rows_m = _rows(token_index, seq_start, offs_m, mask_m, HAS_INDEX)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + head * stride_qh + rows_m[:, None] * stride_qr + offs_d[None, :],
                mask=mask_md, other=0.0)

    # Running max (log2 units), normaliser and unnormalised output of the online softmax.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + head * stride_kh
    v_base = V + head * stride_vh
    for start_n in range(0, seqlen, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < seqlen
        rows_n = _rows(token_index, seq_start, offs_kn, mask_n, HAS_INDEX)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + rows_n[:, None] * stride_kr + offs_d[None, :], mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Each block starts inside the segment, so every row keeps a finite max: no NaN.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows_n[:, None] * stride_vr + offs_d[None, :], mask=mask_nd, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(Out + head * stride_oh + rows_m[:, None] * stride_or + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=mask_md)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log, as the fallback
    tl.store(Lse + head * stride_lh + seq_start + offs_m, lse, mask=mask_m)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Delta, token_index,
    stride_or, stride_oh, stride_dor, stride_doh, stride_deltah, total, HEAD_DIM: tl.constexpr,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta = rowsum(dO * O) = rowsum(P * dP): the softmax-gradient term shared by dQ and dK.
    head = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < total
    rows = _rows(token_index, 0, offs_t, mask_t, HAS_INDEX)
    mask = mask_t[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + head * stride_oh + rows[:, None] * stride_or + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + head * stride_doh + rows[:, None] * stride_dor + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + head * stride_deltah + offs_t, tl.sum(o * do, 1), mask=mask_t)


@_autotune(_DKDV)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta, cu_seqlens, token_index,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_dor, stride_doh,
    stride_gr, stride_gh, stride_lh, HEAD_DIM: tl.constexpr, softmax_scale, qk_scale,
    SEQ_BUCKET,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Transposed formulation (keys on the rows) so dK and dV accumulate without reshuffles:
    # P^T = exp(K Q^T * scale - lse), dV = P^T dO, dS^T = P^T * (V dO^T - delta), dK = dS^T Q.
    seq_start, seqlen, head = _segment(cu_seqlens)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seqlen:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen
    mask_d = offs_d < HEAD_DIM
    rows_n = _rows(token_index, seq_start, offs_n, mask_n, HAS_INDEX)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + head * stride_kh + rows_n[:, None] * stride_kr + offs_d[None, :],
                mask=mask_nd, other=0.0)
    v = tl.load(V + head * stride_vh + rows_n[:, None] * stride_vr + offs_d[None, :],
                mask=mask_nd, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + head * stride_qh
    do_base = DOut + head * stride_doh
    stat_base = head * stride_lh + seq_start
    for start_m in range(0, seqlen, BLOCK_M):
        offs_qm = start_m + offs_m
        mask_m = offs_qm < seqlen
        rows_m = _rows(token_index, seq_start, offs_qm, mask_m, HAS_INDEX)
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows_m[:, None] * stride_qr + offs_d[None, :], mask=mask_md, other=0.0)
        do = tl.load(do_base + rows_m[:, None] * stride_dor + offs_d[None, :],
                     mask=mask_md, other=0.0)
        lse2 = tl.load(Lse + stat_base + offs_qm, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + stat_base + offs_qm, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        # Query columns past the segment end load q = dO = lse = delta = 0, so they add nothing;
        # zeroing them keeps that true whatever the padding lanes compute. (Key rows past the
        # end may overflow here when lse << 0; they are never stored.)
        p_t = tl.where(mask_m[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * softmax_scale
    tl.store(DK + head * stride_gh + rows_n[:, None] * stride_gr + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + head * stride_gh + rows_n[:, None] * stride_gr + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@_autotune(_DQ)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, DQ, Lse, Delta, cu_seqlens, token_index,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_dor, stride_doh,
    stride_gr, stride_gh, stride_lh, HEAD_DIM: tl.constexpr, softmax_scale, qk_scale,
    SEQ_BUCKET,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dQ = (P * (dO V^T - delta)) K * scale, one query block against all key blocks.
    seq_start, seqlen, head = _segment(cu_seqlens)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seqlen:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM
    rows_m = _rows(token_index, seq_start, offs_m, mask_m, HAS_INDEX)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + head * stride_qh + rows_m[:, None] * stride_qr + offs_d[None, :],
                mask=mask_md, other=0.0)
    do = tl.load(DOut + head * stride_doh + rows_m[:, None] * stride_dor + offs_d[None, :],
                 mask=mask_md, other=0.0)
    stat_base = head * stride_lh + seq_start
    lse2 = tl.load(Lse + stat_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + stat_base + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + head * stride_kh
    v_base = V + head * stride_vh
    for start_n in range(0, seqlen, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < seqlen
        rows_n = _rows(token_index, seq_start, offs_kn, mask_n, HAS_INDEX)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + rows_n[:, None] * stride_kr + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(v_base + rows_n[:, None] * stride_vr + offs_d[None, :], mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Keys past the segment end load k = 0 and add nothing, but exp2(0 - lse2) can overflow
        # when the row's scores are all very negative (inf * 0 = NaN): zero them explicitly.
        p = tl.where(mask_n[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * softmax_scale
    tl.store(DQ + head * stride_gh + rows_m[:, None] * stride_gr + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------------
# Launchers


def _block_d(head_dim: int) -> int:
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"partition_attention (triton): head_dim must be in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    return triton.next_power_of_2(head_dim)


def _seq_bucket(max_seqlen: int) -> int:
    # Autotuning key: one tuning per power-of-two bucket, not per batch's exact max_seqlen.
    return min(max(triton.next_power_of_2(max_seqlen), 16), 4096)


def _layout(q: torch.Tensor, cu_seqlens: torch.Tensor, token_index: torch.Tensor | None):
    """(total packed rows, segments, whether rows outside every segment need zeros, index arg)."""
    rows = q.shape[0]
    total = rows if token_index is None else token_index.shape[0]
    # token_index has no repeats (validated), so it covers every row iff it has R entries.
    need_zeros = total < rows
    index = cu_seqlens if token_index is None else token_index.contiguous()  # dummy if unused
    return total, cu_seqlens.numel() - 1, need_zeros, index


def _grid(max_seqlen: int, heads: int, num_segments: int, block: str):
    return lambda meta: (triton.cdiv(max_seqlen, meta[block]), heads, num_segments)


def partition_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward; returns ``(out (R, H, Dh) in q.dtype, lse (H, T) fp32)``."""
    rows, heads, head_dim = q.shape
    block_d = _block_d(head_dim)
    total, num_segments, need_zeros, index = _layout(q, cu_seqlens, token_index)
    cu_seqlens = cu_seqlens.contiguous()
    out = new_output((rows, heads, head_dim), q, q.dtype, need_zeros)
    lse = new_output((heads, total), q, torch.float32)
    if total == 0 or num_segments == 0 or max_seqlen == 0 or heads == 0:
        return out, lse
    launch(
        _fwd_kernel, _grid(max_seqlen, heads, num_segments, "BLOCK_M"),
        q, k, v, out, lse, cu_seqlens, index,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        head_dim, softmax_scale * LOG2E, _seq_bucket(max_seqlen),
        HAS_INDEX=token_index is not None, BLOCK_D=block_d,
    )
    return out, lse


def partition_attention_bwd(
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
    """Backward from the saved ``lse``; returns ``(dq, dk, dv)``, each ``(R, H, Dh)``."""
    rows, heads, head_dim = q.shape
    block_d = _block_d(head_dim)
    total, num_segments, need_zeros, index = _layout(q, cu_seqlens, token_index)
    cu_seqlens = cu_seqlens.contiguous()
    lse = lse.contiguous()
    dq, dk, dv = (new_output((rows, heads, head_dim), q, q.dtype, need_zeros) for _ in range(3))
    if total == 0 or num_segments == 0 or max_seqlen == 0 or heads == 0:
        return dq, dk, dv
    has_index = token_index is not None
    delta = new_output(lse.shape, q, torch.float32)

    launch(
        _bwd_preprocess_kernel, (triton.cdiv(total, _PRE_BLOCK), heads),
        out, dout, delta, index,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        total, head_dim,
        HAS_INDEX=has_index, BLOCK_M=_PRE_BLOCK, BLOCK_D=block_d,
    )
    common = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        head_dim, softmax_scale, softmax_scale * LOG2E, _seq_bucket(max_seqlen),
    )
    launch(
        _bwd_dkdv_kernel, _grid(max_seqlen, heads, num_segments, "BLOCK_N"),
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens, index, *common,
        HAS_INDEX=has_index, BLOCK_D=block_d,
    )
    launch(
        _bwd_dq_kernel, _grid(max_seqlen, heads, num_segments, "BLOCK_M"),
        q, k, v, dout, dq, lse, delta, cu_seqlens, index, *common,
        HAS_INDEX=has_index, BLOCK_D=block_d,
    )
    return dq, dk, dv
