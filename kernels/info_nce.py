"""Triton kernels for the InfoNCE statistics: a one-pass forward and two backward designs, one
that computes each logit once and keeps ``dL/dlogits`` in a bounded row chunk for the transposed
product, one that recomputes the logits on each side and keeps nothing; the cost model chooses.

One *query/key problem* (see ``spcl_fast.reference.info_nce`` for the maths and the PyTorch
twin of these launchers): un-normalised rows ``zq (Mq, d)`` and ``zk (Mk, d)``, logits
``L[i, j] = scale * <zq_i, zk_j> * inv_q[i] * inv_k[j]`` with the inverse row norms computed
once by a small kernel, so the normalisation is fused into the tiles and no normalised copy is
ever written. Positive of query ``i``: key ``(i + pos_shift) % pos_mod + key_offset``; with
``SELF_MASK`` key ``i + key_offset`` is not a candidate (NT-Xent over ``[a; b]``, where queries
and keys are the same rows); with ``HAS_GROUPS`` neither is a key of the query's group id other
than its positive. These rules are runtime integers and constexpr flags, so CLIP's cross-view
loss, NT-Xent and both of them against all-gathered keys of other ranks run the same kernels.

The launchers pad ``d`` to a multiple of 16 (a zero-padded copy where the rows are not already
16-aligned: zeros change neither the dots nor the norms), so every feature load is a vector load.
Widths up to ``RESIDENT_D`` keep a block's own rows in registers across all key blocks (and, in
the backward, its gradient rows); wider rows are streamed in ``BLOCK_D`` chunks.

* ``_fwd_kernel``: one program per block of ``BLOCK_M`` query rows streams over key blocks,
  keeping a running max and sum in fp32: the row log-sum-exp and the positive logit. With
  ``WRITE_COL`` (CLIP's symmetric loss) the same logits tile also gives each key column's max
  and sum over this row block, written as partials; ``_col_lse_kernel`` merges them in row-block
  order. So the column log-sum-exp costs no second pass over the logits.
* ``_bwd_rows_kernel``: per block of query rows, recomputes the logits once (the key tile is
  loaded once for both dots) and forms ``G = dL/dlogits`` from the saved log-sum-exps
  (``_grad_tile``: scaled to ~[-1, 1] and rounded to the input dtype); for resident widths it
  accumulates ``G @ n_k`` and writes ``dzq`` itself. With ``STORE_G`` it also stores ``G`` into
  a row chunk's buffer for the key side.

The key side, ``dzk = f(G^T @ n_q)``, in one of two designs (``info_nce_bwd``'s ``design``):

* **stored G** (any width): the rows kernel runs per row chunk with ``STORE_G``;
  ``_gemm_kernel`` multiplies ``G^T @ n_q`` over the chunk's rows into an fp32 accumulator of
  ``dzk`` (and ``G @ n_k`` into ``dzq``'s for wide rows): plain matmuls over the stored ``G``,
  no logits recomputed. ``_normalize_bwd_kernel`` applies the normalisation's backward
  ``dz = inv * (g - n <n, g>)`` to the accumulators. Fwd + bwd: ``8 Mq Mk d`` FLOPs against the
  algorithmic ``6 Mq Mk d``; beyond the inputs, ``G`` is written and read once per chunk (twice
  for wide rows): ``Mq Mk`` elements of the input dtype each way.
* **recompute** (resident widths only): the rows kernel runs once over all rows without
  ``STORE_G``, and ``_bwd_cols_kernel`` mirrors it on the key side: one program per block of
  key rows keeps them and an fp32 ``G^T @ n_q`` accumulator in registers, streams over the query
  blocks recomputing each logits tile and its ``G`` (the same ``_grad_tile``, so both sides
  multiply the same values) and writes ``dzk`` once. Fwd + bwd: ``10 Mq Mk d`` FLOPs and the
  exponentials of ``G`` twice, but no ``O(Mq Mk)`` traffic and two backward launches.

The op passes the design ``spcl_fast.kernels.cost.choose_bwd_design`` bounds faster on the
device's machine (counted bytes, FLOPs and exponentials of each design's launches at the
call's ``Mq``, ``Mk``, ``d``, dtype and column statistics; host integers, no device sync).
Recompute wins where ``G``'s traffic takes longer than the extra matmuls and exponentials: at
small widths on a machine with many FLOPs per byte (docs/kernels.md: the choice's table). Wide
rows stay with the stored ``G``: their gradient rows do not fit in registers, and the extra
logits cost ``2 Mq Mk d`` against ``G``'s fixed traffic.

Every output element is written by one program in a fixed order in both designs: no atomics,
bitwise deterministic. Extra memory: the column partials ``8 * ceil(Mq / BLOCK_M) * Mk`` bytes
(symmetric CLIP only), the ``G`` chunk (stored design: at most ``G_CHUNK_COPIES`` times the
bytes of the padded keys, at least 256 rows) and fp32 gradient accumulators:
``O((Mq + Mk) d)``, never ``O(Mq * Mk)`` beyond the chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DOT_PRECISION, INTERPRET, configs, launch, new_output, tuned

NORM_EPS = 1e-12  # F.normalize's default
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Rows whose norm was clamped to eps (inv == 1/eps) take no projection term in the backward.
INV_EPS_HALF = tl.constexpr(0.5 / NORM_EPS)

# Widest padded rows a program keeps in registers: its query rows in the forward; its query rows
# and their fp32 gradient rows in the backward (16-bit at 256 and fp32 at 128 spill there at 32
# and 64 rows: aot tier, sm_80/sm_90). The interpreter's 64 makes the tests' d = 70 and 1000
# take the streamed path.
RESIDENT_D = {"fwd": {torch.float16: 256, torch.bfloat16: 256, torch.float32: 128},
              "bwd": {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}}
INTERPRET_RESIDENT_D = 64
# Streamed feature chunk (fp32 operands take twice the registers and shared memory).
STREAM_BLOCK_D = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
# Query rows per forward program: fixed by the launcher (not tuned), since the column partials
# have one row per block.
FWD_BLOCK_M = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}
# The backward's G chunk holds at most this many times the padded keys' bytes (>= 256 rows).
G_CHUNK_COPIES = 16
G_CHUNK_MIN_ROWS = 256

# 8 warps: 4 spill at 128 resident 16-bit rows (sm_80).
_FWD_CONFIGS = configs(
    [({"BLOCK_N": 64}, 8, 3),
     ({"BLOCK_N": 32}, 8, 3)],
    {"BLOCK_N": 32},
)
_ROWS_CONFIGS = configs(
    [({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 2),
     ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 2),
     ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 2)],
    {"BLOCK_M": 32, "BLOCK_N": 32},
)
# The key side of the recompute backward: BLOCK_N key rows resident, BLOCK_M query rows a step.
_COLS_CONFIGS = configs(
    [({"BLOCK_N": 64, "BLOCK_M": 64}, 8, 2),
     ({"BLOCK_N": 32, "BLOCK_M": 64}, 4, 2)],
    {"BLOCK_N": 32, "BLOCK_M": 32},
)
_GEMM_CONFIGS = configs(
    [({"BLOCK_O": 128, "BLOCK_R": 64}, 8, 3),
     ({"BLOCK_O": 64, "BLOCK_R": 64}, 4, 3)],
    {"BLOCK_O": 32, "BLOCK_R": 32},
)
# Tuned once per problem size (a training run has one) and variant; the autotuner adds dtypes.
_FWD_KEY = ["Mq", "Mk", "D", "SELF_MASK", "HAS_GROUPS", "WRITE_COL"]
_ROWS_KEY = ["Mk", "D", "HAS_COL", "SELF_MASK", "HAS_GROUPS", "STORE_G"]  # not row_end
_COLS_KEY = ["Mq", "Mk", "D", "HAS_COL", "SELF_MASK", "HAS_GROUPS"]
_GEMM_KEY = ["D", "stride_g_out", "stride_g_red"]  # the keys (padded Mk) and orientation


def _resident_pruning(outer: str):
    """The pruning of a kernel whose ``outer`` block of rows is resident with its fp32 gradient
    rows: those spill beyond 64 rows of 16-bit features and 32 of fp32 (aot tier, sm_80/sm_90);
    streamed rows (``RESIDENT`` false) hold no gradient rows."""
    def prune(configs, named_args, **kwargs):
        most = 32 if named_args["Q"].dtype == torch.float32 else 64
        return tuned([c for c in configs if INTERPRET or not kwargs.get("RESIDENT", True)
                      or c.kwargs[outer] <= most])

    return prune


_prune_rows, _prune_cols = _resident_pruning("BLOCK_M"), _resident_pruning("BLOCK_N")


@triton.jit
def _inv_norm_kernel(Z, INV, M, D, stride_z, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_d = tl.arange(0, BLOCK_D)
    base = Z + rows.to(tl.int64)[:, None] * stride_z
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = tl.load(base + dd[None, :], mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    tl.store(INV + rows, 1.0 / tl.maximum(tl.sqrt(sumsq), eps), mask=row_ok)


@triton.jit
def _streamed_dot(q_base, k_base, row_ok, col_ok, D,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Q[rows] @ K[cols]^T`` as a ``(BLOCK_M, BLOCK_N)`` fp32 tile, ``d`` in chunks."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        q = tl.load(q_base + d0, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_base + d0, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _candidates(cols, row_ok, col_ok, pos_col, self_col, g_q, GK,
                SELF_MASK: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """Which (query, key) pairs of the tile are candidates: in range, not the query itself
    (``SELF_MASK``), not a key of the query's group other than its positive (``HAS_GROUPS``)."""
    keep = row_ok[:, None] & col_ok[None, :]
    if SELF_MASK:
        keep = keep & (cols[None, :] != self_col[:, None])
    if HAS_GROUPS:
        g_k = tl.load(GK + cols, mask=col_ok, other=0)
        keep = keep & ((g_k[None, :] != g_q[:, None]) | (cols[None, :] == pos_col[:, None]))
    return keep


@triton.autotune(configs=_FWD_CONFIGS, key=_FWD_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, INV_Q, INV_K, GQ, GK, LSE, POS, COL_M, COL_S,
    Mq, Mk, D, stride_q, stride_k, scale,
    key_offset, pos_shift, pos_mod,
    SELF_MASK: tl.constexpr, HAS_GROUPS: tl.constexpr, WRITE_COL: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Mq
    q_scale = tl.load(INV_Q + rows, mask=row_ok, other=0.0) * scale
    pos_col = (rows + pos_shift) % pos_mod + key_offset
    self_col = rows + key_offset
    g_q = rows
    if HAS_GROUPS:
        g_q = tl.load(GQ + rows, mask=row_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + rows.to(tl.int64)[:, None] * stride_q + offs_d[None, :]
    if RESIDENT:  # the block's rows stay in registers across all key blocks
        q = tl.load(q_base, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, Mk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < Mk
        inv_k = tl.load(INV_K + cols, mask=col_ok, other=0.0)
        k_base = K + cols.to(tl.int64)[:, None] * stride_k + offs_d[None, :]
        if RESIDENT:
            k = tl.load(k_base, mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            logits = _streamed_dot(q_base, k_base, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_D)
        logits = logits * q_scale[:, None] * inv_k[None, :]
        keep = _candidates(cols, row_ok, col_ok, pos_col, self_col, g_q, GK, SELF_MASK,
                           HAS_GROUPS)
        logits = tl.where(keep, logits, float("-inf"))
        p_i += tl.sum(tl.where(cols[None, :] == pos_col[:, None], logits, 0.0), axis=1)
        # Online log-sum-exp in base 2 (exp2 is the hardware instruction); a row whose
        # candidates so far are all masked keeps m = -inf and is shifted by 0 instead.
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp2((m_i - m_use) * LOG2E) + tl.sum(
            tl.exp2((logits - m_use[:, None]) * LOG2E), axis=1)
        m_i = m_new
        if WRITE_COL:  # this row block's max and sum of every key column, from the same tile
            c_m = tl.max(logits, axis=0)
            c_use = tl.where(c_m == float("-inf"), 0.0, c_m)
            c_s = tl.sum(tl.exp2((logits - c_use[None, :]) * LOG2E), axis=0)
            part = pid.to(tl.int64) * Mk + cols
            tl.store(COL_M + part, c_m, mask=col_ok)
            tl.store(COL_S + part, c_s, mask=col_ok)
    tl.store(LSE + rows, m_i + tl.log2(s_i) * LN2, mask=row_ok)
    tl.store(POS + rows, p_i, mask=row_ok)


@triton.jit
def _col_lse_kernel(COL_M, COL_S, LSE, Mk, n_blocks, BLOCK: tl.constexpr):
    """Merge the forward's per-row-block column partials, in row-block order."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < Mk
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(0, n_blocks):
        part = b * Mk.to(tl.int64) + cols
        m_b = tl.load(COL_M + part, mask=ok, other=float("-inf"))
        s_b = tl.load(COL_S + part, mask=ok, other=0.0)
        m_new = tl.maximum(m, m_b)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2((m - m_use) * LOG2E) + s_b * tl.exp2((m_b - m_use) * LOG2E)
        m = m_new
    tl.store(LSE + cols, m + tl.log2(s) * LN2, mask=ok)


@triton.jit
def _query_side(rows, row_ok, INV_Q, LSE_R, D_ROW, D_POS, GQ, scale, key_offset, pos_shift,
                pos_mod, HAS_GROUPS: tl.constexpr):
    """What the backward needs of a block of query rows: inverse norms (and times ``scale``),
    row log-sum-exps, the weights of the row and positive statistics, the positive's and the
    query's own key column, the group ids (the rows themselves without ``HAS_GROUPS``)."""
    inv_q = tl.load(INV_Q + rows, mask=row_ok, other=0.0)
    r = tl.load(LSE_R + rows, mask=row_ok, other=0.0)
    alpha = tl.load(D_ROW + rows, mask=row_ok, other=0.0)
    gamma = tl.load(D_POS + rows, mask=row_ok, other=0.0)
    pos_col = (rows + pos_shift) % pos_mod + key_offset
    self_col = rows + key_offset
    g_q = rows
    if HAS_GROUPS:
        g_q = tl.load(GQ + rows, mask=row_ok, other=0)
    return inv_q, inv_q * scale, r, alpha, gamma, pos_col, self_col, g_q


@triton.jit
def _grad_tile(dots, q_scale, inv_k, cols, row_ok, col_ok, r, alpha, gamma, c, beta, pos_col,
               self_col, g_q, GK, gscale, Z,
               HAS_COL: tl.constexpr, SELF_MASK: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """``G = dL/dlogits`` of one ``(queries, keys)`` tile from its raw dots, times ``gscale``,
    rounded to the input dtype (``Z``'s): the one formula both sides of the backward multiply
    with, so the query and key gradients come from the same ``G`` values.

    ``G[i, j] = alpha_i P[i, j] + beta_j Q[i, j] + gamma_i [j == pos(i)]`` over candidates, with
    ``P`` the row softmax (``r``: row log-sum-exps) and ``Q`` the column one (``c``, only with
    ``HAS_COL``). ``G`` is multiplied in the input dtype, so it is scaled to ~[-1, 1] first
    (``gscale``): fp16 keeps its precision when the weights are ~1/M."""
    logits = dots * q_scale[:, None] * inv_k[None, :]
    grad = alpha[:, None] * tl.exp2((logits - r[:, None]) * LOG2E)
    if HAS_COL:
        grad += beta[None, :] * tl.exp2((logits - c[None, :]) * LOG2E)
    grad += tl.where(cols[None, :] == pos_col[:, None], gamma[:, None], 0.0)
    keep = _candidates(cols, row_ok, col_ok, pos_col, self_col, g_q, GK, SELF_MASK, HAS_GROUPS)
    # where(), not a product: masked entries may hold inf from exp2 of a masked logit.
    grad = tl.where(keep, grad, 0.0)
    return (grad * gscale).to(Z.dtype.element_ty)


@triton.jit
def _store_normalized_grad(acc, gain, inv, z_ptrs, dz_ptrs, ok):
    """``dz = inv * (g - n <n, g>)`` with ``g = gain * acc`` (``acc``: ``G @ n`` of the other
    side, ``gain = scale / gscale``) and ``n = z * inv``, stored. The projection is taken from
    the same (rounded) ``g``, so ``dz`` stays orthogonal to ``z`` as it must; rows clamped by eps
    in the forward take none (F.normalize's derivative)."""
    g = acc * gain
    z = tl.load(z_ptrs, mask=ok, other=0.0).to(tl.float32)
    rho = tl.sum(z * g, axis=1) * inv
    proj = tl.where(inv < INV_EPS_HALF, inv * inv * rho, 0.0)
    dz = g * inv[:, None] - z * proj[:, None]
    tl.store(dz_ptrs, dz.to(dz_ptrs.dtype.element_ty), mask=ok)


@triton.autotune(configs=_ROWS_CONFIGS, key=_ROWS_KEY,
                 prune_configs_by={"early_config_prune": _prune_rows})
@triton.jit
def _bwd_rows_kernel(
    Q, K, INV_Q, INV_K, GQ, GK, LSE_R, LSE_C, D_ROW, D_COL, D_POS, GSCALE, GBUF, DZ,
    row0, row_end, Mk, D, stride_q, stride_k, stride_g, stride_dz, scale,
    key_offset, pos_shift, pos_mod,
    HAS_COL: tl.constexpr, SELF_MASK: tl.constexpr, HAS_GROUPS: tl.constexpr,
    RESIDENT: tl.constexpr, STORE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = row0 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    inv_q, q_scale, r, alpha, gamma, pos_col, self_col, g_q = _query_side(
        rows, row_ok, INV_Q, LSE_R, D_ROW, D_POS, GQ, scale, key_offset, pos_shift, pos_mod,
        HAS_GROUPS)
    gscale = tl.load(GSCALE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + rows.to(tl.int64)[:, None] * stride_q + offs_d[None, :]
    if RESIDENT:
        q = tl.load(q_base, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    g_base = GBUF + (rows - row0).to(tl.int64)[:, None] * stride_g
    for n0 in range(0, Mk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < Mk
        inv_k = tl.load(INV_K + cols, mask=col_ok, other=0.0)
        k_base = K + cols.to(tl.int64)[:, None] * stride_k + offs_d[None, :]
        if RESIDENT:  # one load of the key tile for both dots
            k = tl.load(k_base, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            dots = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            dots = _streamed_dot(q_base, k_base, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_D)
        c = inv_k  # placeholders without the column statistics
        beta = inv_k
        if HAS_COL:
            c = tl.load(LSE_C + cols, mask=col_ok, other=0.0)
            beta = tl.load(D_COL + cols, mask=col_ok, other=0.0)
        g_low = _grad_tile(dots, q_scale, inv_k, cols, row_ok, col_ok, r, alpha, gamma, c, beta,
                           pos_col, self_col, g_q, GK, gscale, Q, HAS_COL, SELF_MASK, HAS_GROUPS)
        if STORE_G:
            tl.store(g_base + cols[None, :], g_low, mask=row_ok[:, None] & col_ok[None, :])
        if RESIDENT:
            n_k = (k.to(tl.float32) * inv_k[:, None]).to(k.dtype)
            acc = tl.dot(g_low, n_k, acc, input_precision=DOT_PRECISION)
    if RESIDENT:
        _store_normalized_grad(acc, scale / gscale, inv_q, q_base,
                               DZ + rows.to(tl.int64)[:, None] * stride_dz + offs_d[None, :],
                               row_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_COLS_CONFIGS, key=_COLS_KEY,
                 prune_configs_by={"early_config_prune": _prune_cols})
@triton.jit
def _bwd_cols_kernel(
    Q, K, INV_Q, INV_K, GQ, GK, LSE_R, LSE_C, D_ROW, D_COL, D_POS, GSCALE, DZ,
    Mq, Mk, D, stride_q, stride_k, stride_dz, scale, key_offset, pos_shift, pos_mod,
    HAS_COL: tl.constexpr, SELF_MASK: tl.constexpr, HAS_GROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The key side of the recompute backward (resident widths): one program per block of key
    columns keeps its key rows and an fp32 ``G^T @ n_q`` accumulator in registers, streams over
    the query blocks recomputing each logits tile and its ``G`` (:func:`_grad_tile`, as the
    rows kernel forms it), and writes ``dzk`` once: no ``G`` in memory, no atomics."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Mk
    inv_k = tl.load(INV_K + cols, mask=col_ok, other=0.0)
    c = inv_k  # placeholders without the column statistics
    beta = inv_k
    if HAS_COL:
        c = tl.load(LSE_C + cols, mask=col_ok, other=0.0)
        beta = tl.load(D_COL + cols, mask=col_ok, other=0.0)
    gscale = tl.load(GSCALE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_base = K + cols.to(tl.int64)[:, None] * stride_k + offs_d[None, :]
    k = tl.load(k_base, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, Mq, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < Mq
        inv_q, q_scale, r, alpha, gamma, pos_col, self_col, g_q = _query_side(
            rows, row_ok, INV_Q, LSE_R, D_ROW, D_POS, GQ, scale, key_offset, pos_shift, pos_mod,
            HAS_GROUPS)
        q = tl.load(Q + rows.to(tl.int64)[:, None] * stride_q + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        dots = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        g_low = _grad_tile(dots, q_scale, inv_k, cols, row_ok, col_ok, r, alpha, gamma, c, beta,
                           pos_col, self_col, g_q, GK, gscale, Q, HAS_COL, SELF_MASK, HAS_GROUPS)
        n_q = (q.to(tl.float32) * inv_q[:, None]).to(q.dtype)
        acc = tl.dot(tl.trans(g_low), n_q, acc, input_precision=DOT_PRECISION)
    _store_normalized_grad(acc, scale / gscale, inv_k, k_base,
                           DZ + cols.to(tl.int64)[:, None] * stride_dz + offs_d[None, :],
                           col_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_GEMM_CONFIGS, key=_GEMM_KEY, restore_value=["ACC"])
@triton.jit
def _gemm_kernel(
    GBUF, Z, INV, ACC, M_out, M_red, D, stride_g_out, stride_g_red, stride_z, stride_acc,
    ACCUMULATE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """``ACC[o] (+)= sum_r G[o, r] * Z[r] * INV[r]``, ``G[o, r]`` at ``o * stride_g_out +
    r * stride_g_red`` (so ``G`` or its transpose), accumulated in fp32 in a fixed order. The
    feature chunk is the fastest grid axis, so the programs that read the same rows of ``G``
    run together (``G`` is re-read from L2, not memory, for wide rows)."""
    out = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = out < M_out
    dd = tl.program_id(0) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dd < D
    acc = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    for r0 in range(0, M_red, BLOCK_R):
        red = r0 + tl.arange(0, BLOCK_R)
        red_ok = red < M_red
        g = tl.load(GBUF + red.to(tl.int64)[:, None] * stride_g_red
                    + out.to(tl.int64)[None, :] * stride_g_out,
                    mask=red_ok[:, None] & out_ok[None, :], other=0.0)
        inv = tl.load(INV + red, mask=red_ok, other=0.0)
        x = tl.load(Z + red.to(tl.int64)[:, None] * stride_z + dd[None, :],
                    mask=red_ok[:, None] & d_ok[None, :], other=0.0)
        n = (x.to(tl.float32) * inv[:, None]).to(x.dtype)
        acc = tl.dot(tl.trans(g), n, acc, input_precision=DOT_PRECISION)
    ptr = ACC + out.to(tl.int64)[:, None] * stride_acc + dd[None, :]
    ok = out_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(ptr, mask=ok, other=0.0)
    tl.store(ptr, acc, mask=ok)


@triton.jit
def _normalize_bwd_kernel(ACC, Z, INV, GSCALE, DZ, M, D, stride_acc, stride_z, stride_dz, scale,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dz = inv * (g - n <n, g>)`` with ``g = scale * ACC / gscale`` and ``n = z * inv``;
    rows clamped by eps in the forward take no projection (F.normalize's derivative)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    inv = tl.load(INV + rows, mask=row_ok, other=0.0)
    gain = scale / tl.load(GSCALE)
    offs_d = tl.arange(0, BLOCK_D)
    a_base = ACC + rows.to(tl.int64)[:, None] * stride_acc + offs_d[None, :]
    z_base = Z + rows.to(tl.int64)[:, None] * stride_z + offs_d[None, :]
    dz_base = DZ + rows.to(tl.int64)[:, None] * stride_dz + offs_d[None, :]
    rho = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & ((d0 + offs_d) < D)[None, :]
        g = tl.load(a_base + d0, mask=ok, other=0.0) * gain
        z = tl.load(z_base + d0, mask=ok, other=0.0).to(tl.float32)
        rho += tl.sum(z * g, axis=1) * inv  # <n, g>
    proj = tl.where(inv < INV_EPS_HALF, inv * inv * rho, 0.0)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & ((d0 + offs_d) < D)[None, :]
        g = tl.load(a_base + d0, mask=ok, other=0.0) * gain
        z = tl.load(z_base + d0, mask=ok, other=0.0).to(tl.float32)
        dz = g * inv[:, None] - z * proj[:, None]
        tl.store(dz_base + d0, dz.to(DZ.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def _pad16(d: int) -> int:
    return triton.cdiv(d, 16) * 16


def _padded(z: torch.Tensor) -> torch.Tensor:
    """``z`` itself when its rows are 16-element aligned and ``d`` is a multiple of 16, else a
    zero-padded ``(M, pad16(d))`` copy: the kernels' feature loads are then all vector loads."""
    m, d = z.shape
    width = _pad16(d)
    if d == width and z.stride(-1) == 1 and z.stride(0) % 16 == 0 and z.data_ptr() % 16 == 0:
        return z
    out = z.new_zeros((m, width))
    out[:, :d] = z
    return out


def _unpadded(dz: torch.Tensor, d: int) -> torch.Tensor:
    return dz if dz.shape[1] == d else dz[:, :d].contiguous()


def _resident(width: int, dtype: torch.dtype, direction: str) -> bool:
    return width <= (INTERPRET_RESIDENT_D if INTERPRET else RESIDENT_D[direction][dtype])


def _block_d(width: int, dtype: torch.dtype, direction: str) -> int:
    """The whole padded row for resident widths, else the streamed chunk (the interpreter's 32
    makes the tests' small d span several chunks)."""
    if _resident(width, dtype, direction):
        return triton.next_power_of_2(width)
    return 32 if INTERPRET else STREAM_BLOCK_D[dtype]


def inv_norms(z: torch.Tensor) -> torch.Tensor:
    """``1 / max(|z_i|, eps)`` per row, fp32, computed in fp32 from any input dtype."""
    m, d = z.shape
    inv = new_output((m,), z, torch.float32)
    block_d = min(256, max(16, triton.next_power_of_2(d)))
    launch(_inv_norm_kernel, (triton.cdiv(m, 32),), z, inv, m, d, z.stride(0), NORM_EPS,
           BLOCK_M=32, BLOCK_D=block_d)
    return inv


def _fwd_block_m(dtype: torch.dtype) -> int:
    return 32 if INTERPRET else FWD_BLOCK_M[dtype]


def info_nce_fwd(zq, zk, scale, key_offset=0, pos_shift=0, pos_mod=None, self_mask=False,
                 col_lse=False, groups_q=None, groups_k=None):
    """Statistics of one query/key problem; same contract as
    ``spcl_fast.reference.info_nce.info_nce_chunked_fwd``: returns fp32
    ``(row_lse (Mq,), pos (Mq,), col_lse (Mk,) or (0,), inv_q (Mq,), inv_k (Mk,))``."""
    zq, zk = _padded(zq), _padded(zk)
    (mq, width), mk = zq.shape, zk.shape[0]
    pos_mod = mq if pos_mod is None else pos_mod
    inv_q, inv_k = inv_norms(zq), inv_norms(zk)
    row, pos = new_output((mq,), zq, torch.float32), new_output((mq,), zq, torch.float32)
    col = new_output((mk if col_lse else 0,), zq, torch.float32)
    block_m = _fwd_block_m(zq.dtype)
    n_blocks = triton.cdiv(mq, block_m)
    col_m = col_s = row  # placeholders the kernel never reads without col_lse
    if col_lse:
        col_m, col_s = (new_output((n_blocks, mk), zq, torch.float32) for _ in range(2))
    has_groups = groups_q is not None
    launch(_fwd_kernel, (n_blocks,), zq, zk, inv_q, inv_k,
           groups_q if has_groups else inv_q, groups_k if has_groups else inv_k, row, pos,
           col_m, col_s, mq, mk, width, zq.stride(0), zk.stride(0), float(scale), key_offset,
           pos_shift, pos_mod, SELF_MASK=self_mask, HAS_GROUPS=has_groups, WRITE_COL=col_lse,
           RESIDENT=_resident(width, zq.dtype, "fwd"), BLOCK_M=block_m,
           BLOCK_D=_block_d(width, zq.dtype, "fwd"))
    if col_lse:
        launch(_col_lse_kernel, (triton.cdiv(mk, 128),), col_m, col_s, col, mk, n_blocks,
               BLOCK=128)
    return row, pos, col, inv_q, inv_k


def g_chunk_rows(mq: int, mk: int, width: int) -> int:
    """Query rows per backward chunk: ``G`` of ``(rows, pad16(Mk))`` stays within
    ``G_CHUNK_COPIES`` times the padded keys (``Mk * width``), at least 256 rows (64 under the
    interpreter, so the tests' 74 NT-Xent rows take two chunks)."""
    if INTERPRET:
        return min(mq, 64)
    rows = G_CHUNK_COPIES * mk * width // max(1, _pad16(mk))
    return min(mq, max(G_CHUNK_MIN_ROWS, rows // 128 * 128))


def _gemm(gbuf, z, inv, acc, m_out, m_red, stride_out, stride_red, accumulate):
    width = z.shape[1]
    block_do = min(64 if z.dtype == torch.float32 else 128, triton.next_power_of_2(width))
    block_do = 32 if INTERPRET else block_do
    launch(_gemm_kernel, lambda meta: (triton.cdiv(width, block_do),
                                       triton.cdiv(m_out, meta["BLOCK_O"])),
           gbuf, z, inv, acc, m_out, m_red, width, stride_out, stride_red, z.stride(0),
           acc.stride(0), ACCUMULATE=accumulate, BLOCK_DO=block_do)


def _normalize_bwd(acc, z, inv, gscale, scale):
    m, width = z.shape
    dz = new_output((m, width), z, z.dtype)
    block_d = 32 if INTERPRET else min(128, triton.next_power_of_2(width))
    launch(_normalize_bwd_kernel, (triton.cdiv(m, 32),), acc, z, inv, gscale, dz, m, width,
           acc.stride(0), z.stride(0), dz.stride(0), float(scale), BLOCK_M=32, BLOCK_D=block_d)
    return dz


# The backward's two designs: "stored" computes each logit once and keeps G per row chunk for
# the matmuls; "recompute" (resident widths only) recomputes every logit on the key side too.
BWD_DESIGNS = ("stored", "recompute")


def bwd_designs(d: int, dtype: torch.dtype) -> tuple[str, ...]:
    """The backward designs the launcher can take at width ``d`` (padded to a multiple of 16):
    both where the rows are resident (each kernel then forms a side's gradient in registers),
    else the stored ``G`` only."""
    return BWD_DESIGNS if _resident(_pad16(d), dtype, "bwd") else BWD_DESIGNS[:1]


def machine_of(device: torch.device) -> str:
    """The cost model's machine for a device: sm_90 and newer are costed as an H100, older GPUs
    as an A100, and anything else (the interpreter's CPU, ``meta``) as an H100."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "A100"
    return "H100"


def info_nce_bwd(zq, zk, inv_q, inv_k, row_lse, col_lse, d_row, d_col, d_pos, scale,
                 key_offset=0, pos_shift=0, pos_mod=None, self_mask=False, groups_q=None,
                 groups_k=None, design="stored"):
    """``(dzq, dzk)`` in the input dtype from the statistics' gradients; same contract as
    ``spcl_fast.reference.info_nce.info_nce_chunked_bwd``. ``design``: ``"stored"`` or, where
    the width admits it (:func:`bwd_designs`), ``"recompute"``; the op
    (``spcl_fast.ops.info_nce``) passes the one the cost model bounds faster
    (``spcl_fast.kernels.cost.choose_bwd_design``)."""
    d = zq.shape[1]
    zq, zk = _padded(zq), _padded(zk)
    (mq, width), mk = zq.shape, zk.shape[0]
    pos_mod = mq if pos_mod is None else pos_mod
    has_col = col_lse.numel() > 0 and d_col.numel() > 0
    if design not in bwd_designs(width, zq.dtype):
        raise ValueError(f"info_nce_bwd: design must be one of {bwd_designs(width, zq.dtype)} "
                         f"at padded width {width} in {zq.dtype}, got {design!r}")
    d_row, d_pos = d_row.float().contiguous(), d_pos.float().contiguous()
    d_col = d_col.float().contiguous() if has_col else d_row
    col_lse = col_lse if has_col else row_lse
    # |G| <= |d_row| + |d_col| + |d_pos|: a device scalar, no host sync.
    weights = [d_row.abs().amax(), d_pos.abs().amax()] + ([d_col.abs().amax()] if has_col else [])
    gscale = (1.0 / torch.stack(weights).sum().clamp_min(1e-30)).reshape(1)
    has_groups = groups_q is not None
    if not has_groups:  # placeholders the kernel never reads
        groups_q, groups_k = inv_q, inv_k
    stats = (inv_q, inv_k, groups_q, groups_k, row_lse, col_lse, d_row, d_col, d_pos, gscale)
    pairing = (float(scale), key_offset, pos_shift, pos_mod)
    flags = {"HAS_COL": has_col, "SELF_MASK": self_mask, "HAS_GROUPS": has_groups}
    if design == "recompute":
        dzq, dzk = (new_output((m, width), zq, zq.dtype) for m in (mq, mk))
        block_d = _block_d(width, zq.dtype, "bwd")
        launch(_bwd_rows_kernel, lambda meta: (triton.cdiv(mq, meta["BLOCK_M"]),), zq, zk,
               *stats, zq, dzq, 0, mq, mk, width, zq.stride(0), zk.stride(0), 0, width,
               *pairing, **flags, RESIDENT=True, STORE_G=False, BLOCK_D=block_d)
        launch(_bwd_cols_kernel, lambda meta: (triton.cdiv(mk, meta["BLOCK_N"]),), zq, zk,
               *stats, dzk, mq, mk, width, zq.stride(0), zk.stride(0), width, *pairing, **flags,
               BLOCK_D=block_d)
        return _unpadded(dzq, d), _unpadded(dzk, d)
    resident = _resident(width, zq.dtype, "bwd")
    chunk = g_chunk_rows(mq, mk, width)
    stride_g = _pad16(mk)
    gbuf = new_output((chunk, stride_g), zq, zq.dtype)
    acc_k = new_output((mk, width), zq, torch.float32)
    if resident:
        dzq = new_output((mq, width), zq, zq.dtype)
    else:
        acc_q = new_output((mq, width), zq, torch.float32)
    for row0 in range(0, mq, chunk):
        rows = min(chunk, mq - row0)
        launch(_bwd_rows_kernel, lambda meta, n=rows: (triton.cdiv(n, meta["BLOCK_M"]),),
               zq, zk, *stats, gbuf, dzq if resident else gbuf, row0, row0 + rows, mk, width,
               zq.stride(0), zk.stride(0), stride_g, width, *pairing, **flags,
               RESIDENT=resident, STORE_G=True, BLOCK_D=_block_d(width, zq.dtype, "bwd"))
        if not resident:  # dzq's rows of this chunk: G @ n_k
            _gemm(gbuf, zk, inv_k, acc_q[row0:row0 + rows], rows, mk, stride_g, 1, False)
        # dzk += G^T @ n_q over this chunk's query rows
        _gemm(gbuf, zq[row0:row0 + rows], inv_q[row0:row0 + rows], acc_k, mk, rows, 1, stride_g,
              row0 > 0)
    if not resident:
        dzq = _normalize_bwd(acc_q, zq, inv_q, gscale, scale)
    dzk = _normalize_bwd(acc_k, zk, inv_k, gscale, scale)
    return _unpadded(dzq, d), _unpadded(dzk, d)
