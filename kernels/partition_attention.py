"""Partition attention in Triton: varlen FlashAttention with the token gather fused into the loads.

Segment ``s`` is packed positions ``cu_seqlens[s]:cu_seqlens[s+1]``. Packed position ``t`` lives in
row ``t`` of ``q/k/v`` (packed layout, ``token_index=None``) or in row ``token_index[t]`` (in-place
layout): every kernel turns packed positions into rows with :func:`_rows` right before a load or a
store, so the gather and the scatter cost one extra int64 load per block and no copy.

Grids are one flat axis (any number of segments: none sits on grid y/z, capped at 65,535).
Dots run in the precision of ``_common.DOT_PRECISION``.

* ``_fwd_kernel``: programs over (segment, head, query block) with the block fastest, so the
  programs of one (segment, head) run together and share its K/V in L2. A query block runs
  against all key blocks of its segment, online softmax in fp32 with ``exp2`` (``log2(e)``
  folded into the score scale); writes ``out`` and ``lse`` (natural log, fp32, ``(H, T)`` in
  packed order, the same contract as the PyTorch fallback). Blocks autotuned per head dim,
  max_seqlen bucket, layout and dtype.
* Backward, one pass (``max_seqlen`` up to the largest tile of :data:`ONEPASS`, 128 rows for
  16-bit operands at head dims 17 to 64, 64 at 16 and 128): ``_bwd_onepass_kernel``, one
  program per (segment, head), loads Q, K, V, O, dO and lse of the segment once as one tile,
  computes ``delta = rowsum(dO * O)`` itself and writes dQ, dK, dV with 5 matmuls (S, dV, dP,
  dQ, dK). The tile is the smallest power of two >= ``max_seqlen``; a config table, not
  autotuning, because the host picks the path from it.
* Backward, two kernels (longer segments): ``_bwd_preprocess_kernel`` (delta), then
  ``_bwd_dkdv_kernel`` (a key block holds dK, dV and loops over the query blocks of its segment)
  and ``_bwd_dq_kernel`` (a query block holds dQ and loops over the key blocks): 7 matmuls per
  block pair, Q/dO re-read per key block and K/V per query block.

Either backward writes each gradient row from exactly one program: no atomics, bitwise
reproducible. The gradients go to any three tensors of equal strides, such as the three views
of one ``(R, 3, H, Dh)`` buffer (:func:`partition_attention_qkvpacked_bwd`).

``max_seqlen`` only sizes grids and picks the backward: a program takes blocks ``b, b + n, ...``
up to its segment's real length, and the one-pass kernel runs a segment longer than its tile
by the two-kernel algorithm inside the program (delta from O), so an understated ``max_seqlen``
(unchecked on CUDA) still computes every row, only slower.

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
    (128, 64, 8, 3, _UPTO64, (16, 32)),
    (64, 64, 8, 3, (64, 128), ()),
    (128, 128, 8, 2, (16, 32), ()),
    (64, 32, 4, 4, _UPTO64, (64,)),
    (128, 32, 8, 3, _UPTO64, _UPTO64),
    (32, 16, 4, 3, (), (128,)),
    (16, 32, 4, 3, (), (128,)),
)
_DKDV = (
    (32, 128, 8, 3, _UPTO64, (16, 32)),
    (32, 64, 4, 3, _UPTO64, (16, 32)),
    (16, 64, 4, 3, (64, 128), _UPTO64),
    (32, 32, 4, 3, (128,), (128,)),
)
_DQ = (
    (64, 32, 4, 3, _ALL, (16, 32)),
    (64, 64, 4, 2, (16, 32), (16, 32)),
    (128, 32, 8, 3, _ALL, (16, 32)),
    (64, 32, 8, 3, _ALL, _UPTO64),
    (32, 32, 4, 3, (), (128,)),
)
_PRE_BLOCK = 16 if INTERPRET else 64
# ptxas's register ceiling for the one-pass kernel: left to itself, ptxas picks as few as 128
# registers for some tiles and spills (aot tier). (On the autotuned kernels it made ptxas spill
# more, so they go without.)
MAXNREG = 255

# The one-pass backward's configs: (fp32 operands, BLOCK_D) -> {tile rows: num_warps}, the tiles
# the aot tier compiles without register spills on sm_80 and sm_90 in both layouts (Triton 3.9).
# A 128-row tile fits only 16-bit operands at BLOCK_D 32 and 64: at 16 and 128 it spills, and a
# 256-row tile spills and overflows sm_80's shared memory; fp32 tiles stop at 64 rows, 32 at
# BLOCK_D 64 and 128. max_seqlen above the largest tile runs the two-kernel backward.
ONEPASS = {
    (False, 16): {16: 2, 32: 4, 64: 4},
    (False, 32): {16: 2, 32: 4, 64: 4, 128: 8},
    (False, 64): {16: 2, 32: 4, 64: 4, 128: 8},
    (False, 128): {16: 4, 32: 4, 64: 8},
    (True, 16): {16: 4, 32: 4, 64: 4},
    (True, 32): {16: 4, 32: 8, 64: 4},
    (True, 64): {16: 4, 32: 4},
    (True, 128): {16: 4, 32: 8},
}
ONEPASS_LONG_BLOCK = 16 if INTERPRET else 32


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
def _segment(cu_seqlens, seg):
    """(start as int64, length) of segment ``seg``."""
    start = tl.load(cu_seqlens + seg)
    return start.to(tl.int64), tl.load(cu_seqlens + seg + 1) - start


@triton.jit
def _program(max_seqlen, heads, BLOCK: tl.constexpr):
    """(first block, block stride, head as int64, segment) of this program.

    The grid is one flat axis of (segment, head, block) with the block fastest, so the programs
    of one (segment, head) run together and share its K/V in L2 (the tutorial's and FA2's
    order), and any number of segments fits (no 65,535 cap of a grid's y/z axis). A program
    takes blocks ``first, first + stride, ...`` up to the segment's real length, so a segment
    longer than ``max_seqlen`` still has every row computed.
    """
    n_blocks = tl.cdiv(max_seqlen, BLOCK)
    pid = tl.program_id(0)
    rest = pid // n_blocks
    return pid % n_blocks, n_blocks, (rest % heads).to(tl.int64), rest // heads


@triton.jit
def _fwd_block(
    q_base, k_base, v_base, o_base, lse_base, token_index, seq_start, seqlen, start_m,
    stride_qr, stride_kr, stride_vr, stride_or, qk_scale, HEAD_DIM: tl.constexpr,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query block against all key blocks of its segment: ``out`` and ``lse`` rows."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    # BLOCK_D is HEAD_DIM padded to a power of two. HEAD_DIM is a constexpr so the compiler
    # sees the mask is constant over runs of 8+ lanes and keeps 16-byte (async) loads.
    mask_d = offs_d < HEAD_DIM
    rows_m = _rows(token_index, seq_start, offs_m, mask_m, HAS_INDEX)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_base + rows_m[:, None] * stride_qr + offs_d[None, :], mask=mask_md, other=0.0)

    # Running max (log2 units), normaliser and unnormalised output of the online softmax.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
    tl.store(o_base + rows_m[:, None] * stride_or + offs_d[None, :],
             acc.to(o_base.dtype.element_ty), mask=mask_md)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log, as the fallback
    tl.store(lse_base + offs_m, lse, mask=mask_m)


@_autotune(_FWD)
@triton.jit(do_not_specialize=["max_seqlen", "heads"])
def _fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens, token_index,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_or, stride_oh,
    stride_lh, HEAD_DIM: tl.constexpr, qk_scale, max_seqlen, heads,
    SEQ_BUCKET,  # autotuning key only
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block, n_blocks, head, seg = _program(max_seqlen, heads, BLOCK_M)
    seq_start, seqlen = _segment(cu_seqlens, seg)
    for start_m in range(block * BLOCK_M, seqlen, n_blocks * BLOCK_M):
        _fwd_block(Q + head * stride_qh, K + head * stride_kh, V + head * stride_vh,
                   Out + head * stride_oh, Lse + head * stride_lh + seq_start, token_index,
                   seq_start, seqlen, start_m, stride_qr, stride_kr, stride_vr, stride_or,
                   qk_scale, HEAD_DIM, HAS_INDEX, BLOCK_M, BLOCK_N, BLOCK_D)


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


@triton.jit
def _stats(lse_base, delta_base, o_base, do, rows, offs, mask, offs_d, mask_d, stride_or,
           DELTA_FROM_OUT: tl.constexpr):
    """(lse in log2 units, delta) of query rows ``offs``: delta read from the preprocess
    kernel's output, or computed here as ``rowsum(dO * O)`` (``DELTA_FROM_OUT``)."""
    lse2 = tl.load(lse_base + offs, mask=mask, other=0.0) * 1.4426950408889634
    if DELTA_FROM_OUT:
        o = tl.load(o_base + rows[:, None] * stride_or + offs_d[None, :],
                    mask=mask[:, None] & mask_d[None, :], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        delta = tl.load(delta_base + offs, mask=mask, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_block(
    q_base, k_base, v_base, o_base, do_base, dk_base, dv_base, lse_base, delta_base, token_index,
    seq_start, seqlen, start_n, stride_qr, stride_kr, stride_vr, stride_or, stride_dor,
    stride_gr, softmax_scale, qk_scale, HEAD_DIM: tl.constexpr, HAS_INDEX: tl.constexpr,
    DELTA_FROM_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block, looping over the query blocks of its segment.

    Transposed formulation (keys on the rows) so dK and dV accumulate without reshuffles:
    P^T = exp(K Q^T * scale - lse), dV = P^T dO, dS^T = P^T * (V dO^T - delta), dK = dS^T Q.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen
    mask_d = offs_d < HEAD_DIM
    rows_n = _rows(token_index, seq_start, offs_n, mask_n, HAS_INDEX)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_base + rows_n[:, None] * stride_kr + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(v_base + rows_n[:, None] * stride_vr + offs_d[None, :], mask=mask_nd, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        offs_qm = start_m + offs_m
        mask_m = offs_qm < seqlen
        rows_m = _rows(token_index, seq_start, offs_qm, mask_m, HAS_INDEX)
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows_m[:, None] * stride_qr + offs_d[None, :], mask=mask_md, other=0.0)
        do = tl.load(do_base + rows_m[:, None] * stride_dor + offs_d[None, :],
                     mask=mask_md, other=0.0)
        lse2, delta = _stats(lse_base, delta_base, o_base, do, rows_m, offs_qm, mask_m, offs_d,
                             mask_d, stride_or, DELTA_FROM_OUT)
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
    tl.store(dk_base + rows_n[:, None] * stride_gr + offs_d[None, :],
             dk.to(dk_base.dtype.element_ty), mask=mask_nd)
    tl.store(dv_base + rows_n[:, None] * stride_gr + offs_d[None, :],
             dv.to(dv_base.dtype.element_ty), mask=mask_nd)


@triton.jit
def _dq_block(
    q_base, k_base, v_base, o_base, do_base, dq_base, lse_base, delta_base, token_index,
    seq_start, seqlen, start_m, stride_qr, stride_kr, stride_vr, stride_or, stride_dor,
    stride_gr, softmax_scale, qk_scale, HEAD_DIM: tl.constexpr, HAS_INDEX: tl.constexpr,
    DELTA_FROM_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = (P * (dO V^T - delta)) K * scale of one query block against all key blocks."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM
    rows_m = _rows(token_index, seq_start, offs_m, mask_m, HAS_INDEX)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_base + rows_m[:, None] * stride_qr + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(do_base + rows_m[:, None] * stride_dor + offs_d[None, :], mask=mask_md, other=0.0)
    lse2, delta = _stats(lse_base, delta_base, o_base, do, rows_m, offs_m, mask_m, offs_d,
                         mask_d, stride_or, DELTA_FROM_OUT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
    tl.store(dq_base + rows_m[:, None] * stride_gr + offs_d[None, :],
             dq.to(dq_base.dtype.element_ty), mask=mask_md)


@_autotune(_DKDV)
@triton.jit(do_not_specialize=["max_seqlen", "heads"])
def _bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta, cu_seqlens, token_index,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_dor, stride_doh,
    stride_gr, stride_gh, stride_lh, HEAD_DIM: tl.constexpr, softmax_scale, qk_scale,
    max_seqlen, heads, SEQ_BUCKET,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block, n_blocks, head, seg = _program(max_seqlen, heads, BLOCK_N)
    seq_start, seqlen = _segment(cu_seqlens, seg)
    stats = head * stride_lh + seq_start
    for start_n in range(block * BLOCK_N, seqlen, n_blocks * BLOCK_N):
        _dkdv_block(Q + head * stride_qh, K + head * stride_kh, V + head * stride_vh,
                    Delta, DOut + head * stride_doh, DK + head * stride_gh, DV + head * stride_gh,
                    Lse + stats, Delta + stats, token_index, seq_start, seqlen, start_n,
                    stride_qr, stride_kr, stride_vr, 0, stride_dor, stride_gr, softmax_scale,
                    qk_scale, HEAD_DIM, HAS_INDEX, False, BLOCK_M, BLOCK_N, BLOCK_D)


@_autotune(_DQ)
@triton.jit(do_not_specialize=["max_seqlen", "heads"])
def _bwd_dq_kernel(
    Q, K, V, DOut, DQ, Lse, Delta, cu_seqlens, token_index,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_dor, stride_doh,
    stride_gr, stride_gh, stride_lh, HEAD_DIM: tl.constexpr, softmax_scale, qk_scale,
    max_seqlen, heads, SEQ_BUCKET,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block, n_blocks, head, seg = _program(max_seqlen, heads, BLOCK_M)
    seq_start, seqlen = _segment(cu_seqlens, seg)
    stats = head * stride_lh + seq_start
    for start_m in range(block * BLOCK_M, seqlen, n_blocks * BLOCK_M):
        _dq_block(Q + head * stride_qh, K + head * stride_kh, V + head * stride_vh, Delta,
                  DOut + head * stride_doh, DQ + head * stride_gh, Lse + stats, Delta + stats,
                  token_index, seq_start, seqlen, start_m, stride_qr, stride_kr, stride_vr, 0,
                  stride_dor, stride_gr, softmax_scale, qk_scale, HEAD_DIM, HAS_INDEX, False,
                  BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _onepass_tile(
    q_base, k_base, v_base, o_base, do_base, dq_base, dk_base, dv_base, lse_base, rows, seqlen,
    stride_qr, stride_kr, stride_vr, stride_or, stride_dor, stride_gr, softmax_scale, qk_scale,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The whole backward of a segment that fits one tile: 5 matmuls, every operand read once.

    S = Q K^T, P = exp(S * scale - lse), dV = P^T dO, dS = P * (dO V^T - delta),
    dQ = dS K * scale, dK = dS^T Q * scale, with delta = rowsum(dO * O) computed here.
    """
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs < seqlen
    mask_td = mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    r = rows[:, None]
    d = offs_d[None, :]
    q = tl.load(q_base + r * stride_qr + d, mask=mask_td, other=0.0)
    k = tl.load(k_base + r * stride_kr + d, mask=mask_td, other=0.0)
    do = tl.load(do_base + r * stride_dor + d, mask=mask_td, other=0.0)
    lse2 = tl.load(lse_base + offs, mask=mask, other=0.0) * 1.4426950408889634
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    # Padding rows and columns (zero operands) would give exp2(0 - lse2), which overflows when
    # lse << 0: zero them so they add nothing to any gradient.
    p = tl.where(mask[:, None] & mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    tl.store(dv_base + r * stride_gr + d, dv.to(dv_base.dtype.element_ty), mask=mask_td)
    v = tl.load(v_base + r * stride_vr + d, mask=mask_td, other=0.0)
    o = tl.load(o_base + r * stride_or + d, mask=mask_td, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION) * softmax_scale
    tl.store(dk_base + r * stride_gr + d, dk.to(dk_base.dtype.element_ty), mask=mask_td)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * softmax_scale
    tl.store(dq_base + r * stride_gr + d, dq.to(dq_base.dtype.element_ty), mask=mask_td)


@triton.jit(do_not_specialize=["heads"])
def _bwd_onepass_kernel(
    Q, K, V, Out, DOut, DQ, DK, DV, Lse, cu_seqlens, token_index,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_or, stride_oh,
    stride_dor, stride_doh, stride_gr, stride_gh, stride_lh, HEAD_DIM: tl.constexpr,
    softmax_scale, qk_scale, heads,
    HAS_INDEX: tl.constexpr, TILE: tl.constexpr, LONG_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (segment, head) on a flat axis (item = segment * heads + head): no cap on
    # the number of segments, and the heads of one segment run side by side (token_index in L2).
    item = tl.program_id(0)
    start, seqlen = _segment(cu_seqlens, item // heads)
    head = (item % heads).to(tl.int64)
    q_base, k_base, v_base = Q + head * stride_qh, K + head * stride_kh, V + head * stride_vh
    o_base, do_base = Out + head * stride_oh, DOut + head * stride_doh
    grad = head * stride_gh
    dq_base, dk_base, dv_base = DQ + grad, DK + grad, DV + grad
    lse_base = Lse + head * stride_lh + start
    if seqlen > TILE:
        # A segment longer than max_seqlen said: still every row, by the two-kernel
        # algorithm inside this program (delta from O; correct, not fast).
        for start_n in range(0, seqlen, LONG_BLOCK):
            _dkdv_block(q_base, k_base, v_base, o_base, do_base, dk_base, dv_base, lse_base,
                        lse_base, token_index, start, seqlen, start_n, stride_qr, stride_kr,
                        stride_vr, stride_or, stride_dor, stride_gr, softmax_scale, qk_scale,
                        HEAD_DIM, HAS_INDEX, True, LONG_BLOCK, LONG_BLOCK, BLOCK_D)
        for start_m in range(0, seqlen, LONG_BLOCK):
            _dq_block(q_base, k_base, v_base, o_base, do_base, dq_base, lse_base, lse_base,
                      token_index, start, seqlen, start_m, stride_qr, stride_kr, stride_vr,
                      stride_or, stride_dor, stride_gr, softmax_scale, qk_scale, HEAD_DIM,
                      HAS_INDEX, True, LONG_BLOCK, LONG_BLOCK, BLOCK_D)
    elif seqlen > 0:
        offs = tl.arange(0, TILE)
        rows = _rows(token_index, start, offs, offs < seqlen, HAS_INDEX)
        _onepass_tile(q_base, k_base, v_base, o_base, do_base, dq_base, dk_base, dv_base,
                      lse_base, rows, seqlen, stride_qr, stride_kr, stride_vr, stride_or,
                      stride_dor, stride_gr, softmax_scale, qk_scale, HEAD_DIM, TILE, BLOCK_D)


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


def _flat(programs: int, num_segments: int, heads: int) -> tuple[int]:
    """A one-axis grid (x takes up to 2^31 - 1 programs)."""
    if programs >= 2**31:
        raise ValueError(f"partition_attention (triton): {num_segments} segments x {heads} heads "
                         f"need {programs} programs, more than a grid takes (2^31 - 1)")
    return (programs,)


def _grid(max_seqlen: int, heads: int, num_segments: int, block: str):
    """The flat grid of :func:`_program`: (segment, head, block) in one axis."""
    return lambda meta: _flat(num_segments * heads * triton.cdiv(max_seqlen, meta[block]),
                              num_segments, heads)


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
    if total == 0 or num_segments == 0 or heads == 0:
        return out, lse
    max_seqlen = max(max_seqlen, 1)  # an understated 0 still gets one block slot per segment
    launch(
        _fwd_kernel, _grid(max_seqlen, heads, num_segments, "BLOCK_M"),
        q, k, v, out, lse, cu_seqlens, index,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        head_dim, softmax_scale * LOG2E, max_seqlen, heads, _seq_bucket(max_seqlen),
        HAS_INDEX=token_index is not None, BLOCK_D=block_d,
    )
    return out, lse


def onepass_tile(max_seqlen: int, head_dim: int, dtype: torch.dtype) -> int:
    """The tile (rows) of the one-pass backward for these inputs, or 0 where the two-kernel
    backward runs: the smallest power of two >= max(max_seqlen, 16), if :data:`ONEPASS` has
    it for the head dim and dtype."""
    tiles = ONEPASS[dtype == torch.float32, _block_d(head_dim)]
    tile = max(16, triton.next_power_of_2(max(max_seqlen, 1)))
    return tile if tile in tiles else 0


def _backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, token_index, softmax_scale,
              dq, dk, dv) -> None:
    """Write the gradients into ``dq, dk, dv`` (three ``(R, H, Dh)`` tensors of equal strides,
    e.g. the views of one ``(R, 3, H, Dh)`` buffer); rows of no segment are left as they are."""
    rows, heads, head_dim = q.shape
    block_d = _block_d(head_dim)
    total, num_segments, _, index = _layout(q, cu_seqlens, token_index)
    if total == 0 or num_segments == 0 or heads == 0:
        return
    assert dq.stride() == dk.stride() == dv.stride(), "gradients must share strides"
    cu_seqlens = cu_seqlens.contiguous()
    lse = lse.contiguous()
    has_index = token_index is not None
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    tile = onepass_tile(max_seqlen, head_dim, q.dtype)
    if tile:
        launch(
            _bwd_onepass_kernel, _flat(num_segments * heads, num_segments, heads),
            q, k, v, out, dout, dq, dk, dv, lse, cu_seqlens, index, *strides,
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), dq.stride(0),
            dq.stride(1), lse.stride(0), head_dim, softmax_scale, softmax_scale * LOG2E,
            heads,
            HAS_INDEX=has_index, TILE=tile, LONG_BLOCK=min(tile, ONEPASS_LONG_BLOCK),
            BLOCK_D=block_d, num_warps=ONEPASS[q.dtype == torch.float32, block_d][tile],
            num_stages=1, maxnreg=MAXNREG,
        )
        return

    max_seqlen = max(max_seqlen, 1)
    delta = new_output(lse.shape, q, torch.float32)
    launch(
        _bwd_preprocess_kernel, (triton.cdiv(total, _PRE_BLOCK), heads),
        out, dout, delta, index,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        total, head_dim,
        HAS_INDEX=has_index, BLOCK_M=_PRE_BLOCK, BLOCK_D=block_d,
    )
    common = (
        *strides, dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        head_dim, softmax_scale, softmax_scale * LOG2E, max_seqlen, heads,
        _seq_bucket(max_seqlen),
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
    need_zeros = _layout(q, cu_seqlens, token_index)[2]
    dq, dk, dv = (new_output(q.shape, q, q.dtype, need_zeros) for _ in range(3))
    _backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, token_index, softmax_scale,
              dq, dk, dv)
    return dq, dk, dv


def partition_attention_qkvpacked_fwd(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of one ``(R, 3, H, Dh)`` qkv tensor; returns ``(out (R, H, Dh), lse (H, T))``."""
    q, k, v = qkv.unbind(1)
    return partition_attention_fwd(q, k, v, cu_seqlens, max_seqlen, token_index, softmax_scale)


def partition_attention_qkvpacked_bwd(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_index: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """Backward of :func:`partition_attention_qkvpacked_fwd`: one ``(R, 3, H, Dh)`` gradient
    buffer the kernels write into directly (zeros in rows of no segment)."""
    q, k, v = qkv.unbind(1)
    dqkv = new_output(qkv.shape, qkv, qkv.dtype, _layout(q, cu_seqlens, token_index)[2])
    _backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, token_index, softmax_scale,
              *dqkv.unbind(1))
    return dqkv
