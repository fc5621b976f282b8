"""Triton kernels for the InfoNCE statistics: tiled log-sum-exps forward, recompute backward.

One *query/key problem* (see ``spcl_fast.reference.info_nce`` for the maths and the PyTorch
twin of these launchers): un-normalised rows ``zq (Mq, d)`` and ``zk (Mk, d)``, logits
``L[i, j] = scale * <zq_i, zk_j> * inv_q[i] * inv_k[j]`` with the inverse row norms computed
once by a small kernel, so the normalisation is fused into the tiles and no normalised copy is
ever written. Positive of query ``i``: key ``(i + pos_shift) % pos_mod + key_offset``; with
``SELF_MASK`` key ``i + key_offset`` is not a candidate (NT-Xent over ``[a; b]``, where queries
and keys are the same rows). These two index rules are runtime integers and a constexpr flag,
so CLIP's cross-view loss, NT-Xent and both of them against all-gathered keys of other ranks
run the same three kernels.

* ``_lse_fwd_kernel``: one program per block of query rows streams over key blocks (and over
  ``d`` in ``BLOCK_D`` chunks inside each tile), keeping a running max and sum in fp32: the
  row log-sum-exp and the positive logit, picked out of the tile it falls in. The column
  log-sum-exp of the symmetric loss is the same kernel with the roles swapped.
* ``_grad_kernel``: one program per block of *own* rows and per ``BLOCK_DO`` chunk of output
  features loops over the other side's blocks, recomputes the logits tile, forms
  ``G = dL/dlogits`` from the saved log-sum-exps and accumulates ``G @ n_other``; launched once
  with the queries as own rows (``dzq``) and once with the keys (``dzk``, ``KEY_SIDE``). Each
  output row is written by exactly one program: no atomics, bitwise deterministic.
  The normalisation's backward ``dz = inv * (g - n <n, g>)`` needs ``<n_i, g_i>``, a dot over
  all of ``d``; it equals ``sum_j G[i, j] L[i, j]``, which each program sums from its tiles, so
  the output can be split over ``d`` without a second pass.

Extra memory is ``O(Mq + Mk)`` fp32 on top of the gradients: never ``O(Mq * Mk)``.
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


# Row blocks per program (the autotuner picks: small batches want more, smaller programs so every
# SM has work); feature chunks are the launcher's. Some spill for some operands (aot tier,
# sm_80/sm_90, Triton 3.9/3.6: fp32 forward blocks other than 64 rows): the prunes drop them
# there (never the interpreter's configs).
_FWD_CONFIGS = configs(
    [({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
     ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3),
     ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 3)],
    {"BLOCK_M": 32, "BLOCK_N": 32},
)
_GRAD_CONFIGS = configs(
    [({"BLOCK_OWN": 64, "BLOCK_OTHER": 64}, 8, 2),
     ({"BLOCK_OWN": 16, "BLOCK_OTHER": 64}, 4, 2)],
    {"BLOCK_OWN": 32, "BLOCK_OTHER": 32},
)
# Tuned once per problem size (a training run has one) and variant; the autotuner adds dtypes.
_FWD_KEY = ["Mq", "Mk", "D", "SELF_MASK", "WRITE_POS", "HAS_GROUPS"]
_GRAD_KEY = ["M_own", "M_other", "D", "KEY_SIDE", "HAS_COL", "SELF_MASK", "HAS_GROUPS"]


def _prune_fwd(configs, named_args, **kwargs):  # fp32: the 64-row block only (see above)
    fp32 = named_args["Q"].dtype == torch.float32
    return tuned([c for c in configs if not fp32 or INTERPRET or c.kwargs["BLOCK_M"] == 64])


def _prune_grad(configs, named_args, **kwargs):
    # fp32: 16 own rows only; 16-bit: 16 rows spill once d spans several output chunks.
    fp32 = named_args["OWN"].dtype == torch.float32
    several = named_args["D"] > kwargs["BLOCK_DO"]

    def fits(c):
        return INTERPRET or (c.kwargs["BLOCK_OWN"] <= 16 if fp32 else
                             not (several and c.kwargs["BLOCK_OWN"] == 16))

    return tuned([c for c in configs if fits(c)])


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
def _dot_tile(A, B, a_rows, b_rows, a_ok, b_ok, D, stride_a, stride_b,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``A[a_rows] @ B[b_rows]^T`` as a ``(BLOCK_A, BLOCK_B)`` fp32 tile, ``d`` in chunks."""
    offs_d = tl.arange(0, BLOCK_D)
    a_base = A + a_rows.to(tl.int64)[:, None] * stride_a
    b_base = B + b_rows.to(tl.int64)[None, :] * stride_b
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        a = tl.load(a_base + dd[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        bt = tl.load(b_base + dd[:, None], mask=d_ok[:, None] & b_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=_FWD_KEY,
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _lse_fwd_kernel(
    Q, K, INV_Q, INV_K, GQ, GK, LSE, POS,
    Mq, Mk, D, stride_q, stride_k, scale,
    key_offset, pos_shift, pos_mod,
    SELF_MASK: tl.constexpr, WRITE_POS: tl.constexpr, HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Mq
    q_scale = tl.load(INV_Q + rows, mask=row_ok, other=0.0) * scale
    pos_col = (rows + pos_shift) % pos_mod + key_offset
    self_col = rows + key_offset
    if HAS_GROUPS:
        g_q = tl.load(GQ + rows, mask=row_ok, other=0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, Mk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < Mk
        inv_k = tl.load(INV_K + cols, mask=col_ok, other=0.0)
        logits = _dot_tile(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                           BLOCK_M, BLOCK_N, BLOCK_D)
        logits = logits * q_scale[:, None] * inv_k[None, :]
        keep = col_ok[None, :]
        if SELF_MASK:
            keep = keep & (cols[None, :] != self_col[:, None])
        if HAS_GROUPS:
            g_k = tl.load(GK + cols, mask=col_ok, other=0)
            keep = keep & ((g_k[None, :] != g_q[:, None]) | (cols[None, :] == pos_col[:, None]))
        logits = tl.where(keep, logits, float("-inf"))
        if WRITE_POS:
            p_i += tl.sum(tl.where(cols[None, :] == pos_col[:, None], logits, 0.0), axis=1)
        # Online log-sum-exp in base 2 (exp2 is the hardware instruction); a row whose
        # candidates so far are all masked keeps m = -inf and is shifted by 0 instead.
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp2((m_i - m_use) * LOG2E) + tl.sum(
            tl.exp2((logits - m_use[:, None]) * LOG2E), axis=1)
        m_i = m_new
    tl.store(LSE + rows, m_i + tl.log2(s_i) * LN2, mask=row_ok)
    if WRITE_POS:
        tl.store(POS + rows, p_i, mask=row_ok)


@triton.autotune(configs=_GRAD_CONFIGS, key=_GRAD_KEY,
                 prune_configs_by={"early_config_prune": _prune_grad})
@triton.jit
def _grad_kernel(
    OWN, OTHER, INV_OWN, INV_OTHER, G_OWN, G_OTHER, LSE_R, LSE_C, D_ROW, D_COL, D_POS, GSCALE, DZ,
    M_own, M_other, D, stride_own, stride_other, stride_dz, scale,
    key_offset, pos_shift, pos_mod,
    KEY_SIDE: tl.constexpr, HAS_COL: tl.constexpr, SELF_MASK: tl.constexpr, LOWP: tl.constexpr,
    HAS_GROUPS: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    own = tl.program_id(0) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    own_ok = own < M_own
    dd_out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dd_out < D
    inv_own = tl.load(INV_OWN + own, mask=own_ok, other=0.0)
    own_scale = inv_own * scale
    if HAS_GROUPS:
        g_own = tl.load(G_OWN + own, mask=own_ok, other=0)
    # Per-row statistics of this program's own rows (queries, or keys with KEY_SIDE).
    if KEY_SIDE:
        k_idx = own[:, None]
        if HAS_COL:
            c_own = tl.load(LSE_C + own, mask=own_ok, other=0.0)
            beta_own = tl.load(D_COL + own, mask=own_ok, other=0.0)
    else:
        r_own = tl.load(LSE_R + own, mask=own_ok, other=0.0)
        alpha_own = tl.load(D_ROW + own, mask=own_ok, other=0.0)
        gamma_own = tl.load(D_POS + own, mask=own_ok, other=0.0)
        pos_own = (own + pos_shift) % pos_mod + key_offset
        self_own = own + key_offset
    if LOWP:
        # G is cast to the input dtype for the second matmul; scale it to ~[-3, 3] first so
        # fp16 keeps its precision when the weights are ~1/M.
        gscale = tl.load(GSCALE)
    acc = tl.zeros((BLOCK_OWN, BLOCK_DO), dtype=tl.float32)
    rho = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    for o0 in range(0, M_other, BLOCK_OTHER):
        oth = o0 + tl.arange(0, BLOCK_OTHER)
        oth_ok = oth < M_other
        inv_oth = tl.load(INV_OTHER + oth, mask=oth_ok, other=0.0)
        logits = _dot_tile(OWN, OTHER, own, oth, own_ok, oth_ok, D, stride_own, stride_other,
                           BLOCK_OWN, BLOCK_OTHER, BLOCK_D)
        logits = logits * own_scale[:, None] * inv_oth[None, :]
        # G[own, other] = alpha_q P + beta_k Q + gamma_q [k == pos(q)], in (own, other) layout.
        if KEY_SIDE:
            r = tl.load(LSE_R + oth, mask=oth_ok, other=0.0)
            alpha = tl.load(D_ROW + oth, mask=oth_ok, other=0.0)
            gamma = tl.load(D_POS + oth, mask=oth_ok, other=0.0)
            grad = alpha[None, :] * tl.exp2((logits - r[None, :]) * LOG2E)
            if HAS_COL:
                grad += beta_own[:, None] * tl.exp2((logits - c_own[:, None]) * LOG2E)
            pos_q = ((oth + pos_shift) % pos_mod + key_offset)[None, :]
            self_q = (oth + key_offset)[None, :]
            gamma_q = gamma[None, :]
        else:
            k_idx = oth[None, :]
            grad = alpha_own[:, None] * tl.exp2((logits - r_own[:, None]) * LOG2E)
            if HAS_COL:
                c = tl.load(LSE_C + oth, mask=oth_ok, other=0.0)
                beta = tl.load(D_COL + oth, mask=oth_ok, other=0.0)
                grad += beta[None, :] * tl.exp2((logits - c[None, :]) * LOG2E)
            pos_q = pos_own[:, None]
            self_q = self_own[:, None]
            gamma_q = gamma_own[:, None]
        grad += tl.where(k_idx == pos_q, gamma_q, 0.0)
        keep = own_ok[:, None] & oth_ok[None, :]
        if SELF_MASK:
            keep = keep & (k_idx != self_q)
        if HAS_GROUPS:
            g_oth = tl.load(G_OTHER + oth, mask=oth_ok, other=0)
            keep = keep & ((g_own[:, None] != g_oth[None, :]) | (k_idx == pos_q))
        # where(), not a product: masked entries may hold inf from exp2 of a masked logit.
        grad = tl.where(keep, grad, 0.0)
        rho += tl.sum(grad * logits, axis=1)
        x = tl.load(OTHER + oth.to(tl.int64)[:, None] * stride_other + dd_out[None, :],
                    mask=oth_ok[:, None] & dout_ok[None, :], other=0.0)
        if LOWP:
            n_oth = (x.to(tl.float32) * inv_oth[:, None]).to(x.dtype)
            acc = tl.dot((grad * gscale).to(x.dtype), n_oth, acc)
        else:
            acc = tl.dot(grad, x * inv_oth[:, None], acc, input_precision=DOT_PRECISION)
    if LOWP:
        acc = acc / gscale
    z_own = tl.load(OWN + own.to(tl.int64)[:, None] * stride_own + dd_out[None, :],
                    mask=own_ok[:, None] & dout_ok[None, :], other=0.0).to(tl.float32)
    # dz = inv * (scale * G @ n_other - n_own * <n_own, g>),  <n_own, g> = sum_j G L = rho.
    proj = tl.where(inv_own < INV_EPS_HALF, inv_own * inv_own * rho, 0.0)
    dz = acc * own_scale[:, None] - z_own * proj[:, None]
    tl.store(DZ + own.to(tl.int64)[:, None] * stride_dz + dd_out[None, :],
             dz.to(DZ.dtype.element_ty), mask=own_ok[:, None] & dout_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers


def _rows(z: torch.Tensor) -> torch.Tensor:
    return z if z.stride(-1) == 1 else z.contiguous()


def _block_d(d: int, dtype: torch.dtype) -> int:
    # Feature chunk of the logits' dots: fp32 operands take twice the shared memory and
    # registers, so half the chunk keeps them from spilling (tests/test_aot.py). The
    # interpreter's 32 makes the tests' small d span several chunks.
    if INTERPRET:
        return 32
    return min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(d)))


def _block_do(d: int, dtype: torch.dtype) -> int:
    # The whole output row block in registers when d <= 128 (one pass over the other side; 256
    # spills at every row block); larger d splits the output over a second grid axis, each
    # part recomputing the logits.
    if INTERPRET:
        return 32
    return min(128 if dtype != torch.float32 else 64, max(16, triton.next_power_of_2(d)))


def inv_norms(z: torch.Tensor) -> torch.Tensor:
    """``1 / max(|z_i|, eps)`` per row, fp32, computed in fp32 from any input dtype."""
    m, d = z.shape
    inv = new_output((m,), z, torch.float32)
    block_d = min(256, max(16, triton.next_power_of_2(d)))
    launch(_inv_norm_kernel, (triton.cdiv(m, 32),), z, inv, m, d, z.stride(0), NORM_EPS,
           BLOCK_M=32, BLOCK_D=block_d)
    return inv


def _lse(zq, zk, inv_q, inv_k, gq, gk, lse, pos, scale, key_offset, pos_shift, pos_mod, self_mask,
         write_pos):
    mq, d = zq.shape
    has_groups = gq is not None
    launch(_lse_fwd_kernel, lambda meta: (triton.cdiv(mq, meta["BLOCK_M"]),),
           zq, zk, inv_q, inv_k, gq if has_groups else inv_q, gk if has_groups else inv_k, lse,
           pos, mq, zk.shape[0], d, zq.stride(0), zk.stride(0),
           float(scale), key_offset, pos_shift, pos_mod, SELF_MASK=self_mask,
           WRITE_POS=write_pos, HAS_GROUPS=has_groups, BLOCK_D=_block_d(d, zq.dtype))


def info_nce_fwd(zq, zk, scale, key_offset=0, pos_shift=0, pos_mod=None, self_mask=False,
                 col_lse=False, groups_q=None, groups_k=None):
    """Statistics of one query/key problem; same contract as
    ``spcl_fast.reference.info_nce.info_nce_chunked_fwd``: returns fp32
    ``(row_lse (Mq,), pos (Mq,), col_lse (Mk,) or (0,), inv_q (Mq,), inv_k (Mk,))``."""
    zq, zk = _rows(zq), _rows(zk)
    mq, mk = zq.shape[0], zk.shape[0]
    pos_mod = mq if pos_mod is None else pos_mod
    inv_q, inv_k = inv_norms(zq), inv_norms(zk)
    row, pos = new_output((mq,), zq, torch.float32), new_output((mq,), zq, torch.float32)
    col = new_output((mk if col_lse else 0,), zq, torch.float32)
    _lse(zq, zk, inv_q, inv_k, groups_q, groups_k, row, pos, scale, key_offset, pos_shift, pos_mod,
         self_mask, True)
    if col_lse:  # the b -> a direction: the same kernel with the roles swapped
        _lse(zk, zq, inv_k, inv_q, groups_k, groups_q, col, pos, scale, 0, 0, mk, False, False)
    return row, pos, col, inv_q, inv_k


def info_nce_bwd(zq, zk, inv_q, inv_k, row_lse, col_lse, d_row, d_col, d_pos, scale,
                 key_offset=0, pos_shift=0, pos_mod=None, self_mask=False, groups_q=None,
                 groups_k=None):
    """``(dzq, dzk)`` in the input dtype from the statistics' gradients; same contract as
    ``spcl_fast.reference.info_nce.info_nce_chunked_bwd``."""
    zq, zk = _rows(zq), _rows(zk)
    mq, d = zq.shape
    pos_mod = mq if pos_mod is None else pos_mod
    has_col = col_lse.numel() > 0 and d_col.numel() > 0
    d_row, d_pos = d_row.float().contiguous(), d_pos.float().contiguous()
    d_col = d_col.float().contiguous() if has_col else d_row
    col_lse = col_lse if has_col else row_lse
    # |G| <= |d_row| + |d_col| + |d_pos|: a device scalar, no host sync.
    weights = [d_row.abs().amax(), d_pos.abs().amax()] + ([d_col.abs().amax()] if has_col else [])
    gscale = (1.0 / torch.stack(weights).amax().clamp_min(1e-30)).reshape(1)
    dzq, dzk = new_output(zq.shape, zq, zq.dtype), new_output(zk.shape, zk, zk.dtype)
    block_do = _block_do(d, zq.dtype)
    has_groups = groups_q is not None
    if not has_groups:  # placeholders the kernel never reads
        groups_q, groups_k = inv_q, inv_k
    for own, other, inv_own, inv_other, g_own, g_other, dz, key_side in (
            (zq, zk, inv_q, inv_k, groups_q, groups_k, dzq, False),
            (zk, zq, inv_k, inv_q, groups_k, groups_q, dzk, True)):
        m_own = own.shape[0]
        launch(
            _grad_kernel, lambda meta, m=m_own: (triton.cdiv(m, meta["BLOCK_OWN"]),
                                                 triton.cdiv(d, block_do)),
            own, other, inv_own, inv_other, g_own, g_other, row_lse, col_lse, d_row, d_col, d_pos,
            gscale, dz, m_own, other.shape[0], d, own.stride(0), other.stride(0), dz.stride(0),
            float(scale), key_offset, pos_shift, pos_mod, KEY_SIDE=key_side, HAS_COL=has_col,
            SELF_MASK=self_mask, LOWP=zq.dtype != torch.float32, HAS_GROUPS=has_groups,
            BLOCK_D=_block_d(d, zq.dtype), BLOCK_DO=block_do)
    return dzq, dzk
