"""The Triton partition-attention kernels against the fp64 reference (docs/architecture.md §5).

``interpret`` tier: tiny shapes through the public op with ``impl="triton"``: on CPU tensors
under ``TRITON_INTERPRET=1`` (tests/conftest.py turns it on without CUDA), on CUDA tensors where
there is a GPU. ``gpu`` tier: ViT shapes, bf16, determinism, torch.compile, no host syncs.

Pass rule (flash-attention's): ``err(kernel, gt) <= 2 * err(ref_lp, gt) + tol`` for the output and
all three gradients, where ``gt`` is the reference in fp64 and ``ref_lp`` the reference computed
in the test dtype (``upcast=False``); ``err`` is the max abs difference over every row, rows of no
segment included (where everything must be exactly zero).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (  # noqa: F401 (poison_outputs, bf16_dot_in_interpreter: fixtures)
    DEVICE,
    HAS_CUDA,
    bf16_dot_in_interpreter,
    max_err,
    needs_kernel,
    poison_outputs,
    reference_precision,
)

from spcl_fast import partition_attention, partition_attention_qkvpacked, sample_partitions
from spcl_fast.reference.partition_attention import (
    partition_attention_ref,
    partition_attention_torch_bwd,
    partition_attention_torch_fwd,
)

pytestmark = pytest.mark.usefixtures("poison_outputs", "bf16_dot_in_interpreter")


# ---------------------------------------------------------------------------------------------
# helpers


def _cu(lengths: list[int], device=DEVICE) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _qkv(rows: int, heads: int, head_dim: int, dtype, layout: str = "qkv"):
    """Leaf tensor(s) and the (q, k, v) views the op gets.

    ``qkv``: three strided views of one ``(R, 3, H, Dh)`` tensor (a ViT's qkv projection);
    ``mixed``: q contiguous, k a view of an ``(H, R, Dh)`` tensor, v a view of ``(R, H, 2*Dh)``.
    """
    if layout == "qkv":
        qkv = torch.randn(rows, 3, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
        return [qkv], qkv.unbind(1)
    q = torch.randn(rows, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
    k_t = torch.randn(heads, rows, head_dim, device=DEVICE).to(dtype).requires_grad_()
    v_wide = torch.randn(rows, heads, 2 * head_dim, device=DEVICE).to(dtype).requires_grad_()
    return [q, k_t, v_wide], (q, k_t.transpose(0, 1), v_wide[..., head_dim:])


def _reference(q, k, v, dout, cu_seqlens, token_index, scale, dtype, upcast, chunk_segments=None):
    """Reference output and gradients in ``dtype``, as (R, H, Dh) tensors in q's row order.

    Segments are independent, so long plans run in chunks of ``chunk_segments`` segments to keep
    the dense reference's (T, T) scores small.
    """
    rows = q.shape[0]
    index = torch.arange(rows, device=q.device) if token_index is None else token_index
    cu = cu_seqlens.tolist()
    num_segments = len(cu) - 1
    step = num_segments if chunk_segments is None else chunk_segments
    results = [torch.zeros(q.shape, dtype=dtype, device=q.device) for _ in range(4)]
    for s0 in range(0, max(num_segments, 1), max(step, 1)):
        s1 = min(s0 + step, num_segments)
        lo, hi = cu[s0], cu[s1]
        if hi == lo:
            continue
        part = index[lo:hi]
        local_cu = (cu_seqlens[s0 : s1 + 1] - lo).to(torch.int32)
        qp, kp, vp = (t.detach()[part].to(dtype).requires_grad_() for t in (q, k, v))
        out = partition_attention_ref(qp, kp, vp, local_cu, softmax_scale=scale, upcast=upcast)
        grads = torch.autograd.grad(out, (qp, kp, vp), dout[part].to(dtype))
        for res, val in zip(results, (out, *grads), strict=True):
            res[part] = val.detach()
    return results


TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _check(lengths_or_cu, heads, head_dim, dtype, token_index=None, rows=None, layout="qkv",
           softmax_scale=None, chunk_segments=None, entry="separate"):
    """Run the op with impl="triton" (forward and backward) and apply the pass rule.

    ``entry="packed"`` calls :func:`partition_attention_qkvpacked` on the ``(R, 3, H, Dh)`` leaf
    and checks its one gradient buffer (its q, k, v slices against the reference's gradients).
    """
    cu_seqlens = (lengths_or_cu if isinstance(lengths_or_cu, torch.Tensor)
                  else _cu(lengths_or_cu))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    total = int(cu_seqlens[-1])
    rows = total if rows is None else rows
    max_seqlen = max(lengths, default=0)
    leaves, (q, k, v) = _qkv(rows, heads, head_dim, dtype, layout)
    dout = torch.randn(rows, heads, head_dim, device=DEVICE).to(dtype)

    if entry == "packed":
        (qkv,) = leaves
        out = partition_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, token_index=token_index,
                                            softmax_scale=softmax_scale, impl="triton")
        (dqkv,) = torch.autograd.grad(out, qkv, dout)
        assert dqkv.shape == qkv.shape
        grads = dqkv.unbind(1)
    else:
        out = partition_attention(q, k, v, cu_seqlens, max_seqlen, token_index=token_index,
                                  softmax_scale=softmax_scale, impl="triton")
        grads = torch.autograd.grad(out, (q, k, v), dout)
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    args = (q, k, v, dout, cu_seqlens, token_index, scale)
    gt = _reference(*args, torch.float64, True, chunk_segments)
    with reference_precision(dtype):
        ref_lp = _reference(*args, dtype, False, chunk_segments)

    missing = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    missing[token_index if token_index is not None else slice(None)] = False
    names = ("out", "dq", "dk", "dv")
    for name, got, want, low in zip(names, (out, *grads), gt, ref_lp, strict=True):
        assert got.dtype == dtype and got.shape == (rows, heads, head_dim), name
        assert not got.isnan().any(), f"{name} has NaN (a row the kernel did not write?)"
        assert (got[missing] == 0).all(), f"{name} is not zero in rows of no segment"
        err, err_lp = max_err(got, want), max_err(low, want)
        bound = 2 * err_lp + TOL[dtype]
        assert err <= bound, f"{name}: err {err:.3g} > 2 * {err_lp:.3g} + {TOL[dtype]:g}"
    return out, grads


# ---------------------------------------------------------------------------------------------
# interpret tier: tiny shapes, every edge the kernel has

# Ragged: empty segments (first, middle, last), length 1, lengths below, at and above the
# interpreter's block size 16 that are not block multiples, and one exact multiple.
RAGGED = [0, 1, 17, 33, 0, 40, 5, 16, 0]


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [24, 40])
def test_packed_ragged(dtype, head_dim):
    _check(RAGGED, 2, head_dim, dtype)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [24, 40])
def test_in_place_leaves_rows_out(dtype, head_dim):
    # Rows in random order (not sorted within segments) and 11 rows in no segment.
    total = sum(RAGGED)
    rows = total + 11
    token_index = torch.randperm(rows, device=DEVICE)[:total]
    _check(RAGGED, 2, head_dim, dtype, token_index=token_index, rows=rows)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 128])
def test_head_dim_bounds(head_dim):
    _check([7, 20], 1, head_dim, torch.float32)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sampled_plan_in_place(dtype):
    # A real plan: ratios far from 0.5, keep < 1 (rows left out), background skipped.
    gen = torch.Generator().manual_seed(1)
    valid = torch.rand(3, 36, generator=gen) > 0.2
    valid[2] = False  # an image with no valid token: two empty segments
    plan = sample_partitions(3, 36, ratio_range=(0.1, 0.9), keep=0.8, valid_mask=valid,
                             generator=gen).to(DEVICE)
    assert plan.total_tokens < 3 * 36
    _check(plan.cu_seqlens, 2, 24, dtype, token_index=plan.token_index, rows=3 * 36)


@pytest.mark.interpret
@needs_kernel
def test_one_image_full_cover_in_place():
    # token_index covering every row (outputs need no zero fill), one image.
    plan = sample_partitions(1, 30, ratio=0.2, generator=torch.Generator().manual_seed(2))
    plan = plan.to(DEVICE)
    _check(plan.cu_seqlens, 2, 24, torch.float32, token_index=plan.token_index, rows=30)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("token_layout", ["packed", "in_place"])
def test_mixed_strides(token_layout):
    lengths = [9, 0, 21]
    total = sum(lengths)
    token_index = None
    rows = total
    if token_layout == "in_place":
        rows = total + 4
        token_index = torch.randperm(rows, device=DEVICE)[:total]
    _check(lengths, 2, 24, torch.float32, token_index=token_index, rows=rows, layout="mixed",
           softmax_scale=0.37)


@pytest.mark.interpret
@needs_kernel
def test_only_tiny_segments():
    _check([1, 0, 1, 1, 0], 2, 16, torch.float32)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("token_layout", ["packed", "in_place"])
def test_no_tokens(token_layout):
    # Every segment empty: no kernel runs, outputs are all zeros (in place) or empty (packed).
    rows = 0 if token_layout == "packed" else 5
    token_index = None if token_layout == "packed" else torch.zeros(0, dtype=torch.int64,
                                                                   device=DEVICE)
    _check([0, 0], 2, 16, torch.float32, token_index=token_index, rows=rows)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("token_layout", ["packed", "in_place"])
def test_launchers_match_torch_fallback(token_layout):
    # Same contract as the fallback, lse included (natural log, fp32, (H, T) packed order).
    from spcl_fast.kernels.partition_attention import (
        partition_attention_bwd,
        partition_attention_fwd,
    )

    lengths = [3, 0, 19, 1]
    total = sum(lengths)
    rows = total if token_layout == "packed" else total + 6
    token_index = None if token_layout == "packed" else torch.randperm(rows, device=DEVICE)[:total]
    cu_seqlens, max_seqlen, scale = _cu(lengths), max(lengths), 0.2
    q, k, v, dout = torch.randn(4, rows, 3, 32, device=DEVICE).unbind(0)
    out, lse = partition_attention_fwd(q, k, v, cu_seqlens, max_seqlen, token_index, scale)
    out_t, lse_t = partition_attention_torch_fwd(q, k, v, cu_seqlens, max_seqlen, token_index,
                                                 scale)
    assert lse.dtype == torch.float32 and lse.shape == (3, total)
    tol = 1e-2 if HAS_CUDA else 1e-5  # TF32 dots on a GPU, exact fp32 in the interpreter
    torch.testing.assert_close(out, out_t, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, lse_t, atol=tol, rtol=tol)
    grads = partition_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, token_index,
                                    scale)
    grads_t = partition_attention_torch_bwd(dout, q, k, v, out_t, lse_t, cu_seqlens, max_seqlen,
                                            token_index, scale)
    for got, want in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.interpret
@needs_kernel
def test_backward_is_deterministic():
    total = sum(RAGGED)
    token_index = torch.randperm(total + 3, device=DEVICE)[:total]
    _, (q, k, v) = _qkv(total + 3, 2, 24, torch.float16)
    out = partition_attention(q, k, v, _cu(RAGGED), max(RAGGED), token_index, impl="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on padding lanes
@pytest.mark.parametrize("token_layout", ["packed", "in_place"])
def test_very_negative_scores(token_layout):
    # Every score about -400: lse is far below 0, so padding lanes of a block (score 0) would
    # overflow exp(0 - lse) to inf in fp32 unless the kernel masks them before using them.
    lengths = [5, 19]
    total = sum(lengths)
    rows = total if token_layout == "packed" else total + 3
    token_index = None if token_layout == "packed" else torch.randperm(rows, device=DEVICE)[:total]
    direction = torch.zeros(16, device=DEVICE)
    direction[0] = 1.0
    base = direction.expand(rows, 2, 16)
    q = (40 * base + 0.1 * torch.randn(rows, 2, 16, device=DEVICE)).requires_grad_()
    k = (-40 * base + 0.1 * torch.randn(rows, 2, 16, device=DEVICE)).requires_grad_()
    v = torch.randn(rows, 2, 16, device=DEVICE, requires_grad=True)
    cu = _cu(lengths)
    out = partition_attention(q, k, v, cu, max(lengths), token_index, impl="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    gt = _reference(q, k, v, dout, cu, token_index, 0.25, torch.float64, True)
    with reference_precision(torch.float32):
        ref_lp = _reference(q, k, v, dout, cu, token_index, 0.25, torch.float32, False)
    for got, want, low in zip((out, *grads), gt, ref_lp, strict=True):
        assert got.isfinite().all()
        assert max_err(got, want) <= 2 * max_err(low, want) + TOL[torch.float32]


@pytest.mark.interpret
@needs_kernel
def test_max_seqlen_larger_than_needed():
    # max_seqlen only sizes the grid: a loose bound gives the same answer (extra programs exit).
    cu = _cu([5, 12])
    q, k, v = torch.randn(3, 17, 2, 16, device=DEVICE).unbind(0)
    tight = partition_attention(q, k, v, cu, 12, impl="triton")
    loose = partition_attention(q, k, v, cu, 50, impl="triton")
    # (Bitwise equal under the interpreter; on a GPU the bucket may pick other block sizes.)
    torch.testing.assert_close(tight, loose, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# interpret tier: the one-pass backward, the qkv-packed entry, the flat grid

EDGES = [0, 1, 63, 64, 65, 127, 128]  # around the one-pass tiles of 64 and 128 rows

# (dtype, head dim, segment lengths, layout, the one-pass tile they get or 0: two-kernel path)
PATH_CASES = [
    (torch.bfloat16, 64, EDGES, "in_place", 128),
    (torch.float16, 32, [1, 64, 0, 65], "packed", 128),
    (torch.float32, 16, [0, 1, 63, 64], "packed", 64),
    (torch.bfloat16, 128, [0, 1, 63, 64], "in_place", 64),
    (torch.float16, 32, [129, 0, 1], "in_place", 0),
    (torch.float16, 128, [65, 0, 1], "packed", 0),
]


def _tile(max_seqlen, head_dim, dtype):
    from spcl_fast.kernels.partition_attention import onepass_tile

    return onepass_tile(max_seqlen, head_dim, dtype)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on padding lanes
@pytest.mark.parametrize("case", PATH_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-{c[1]}-{c[3]}-tile{c[4]}")
def test_qkvpacked_over_both_backwards(case):
    # Segment lengths at the tile edges through the qkv-packed entry; in place, 9 rows in no
    # segment, whose gradient rows of the one (R, 3, H, Dh) buffer must be exactly zero.
    dtype, head_dim, lengths, token_layout, tile = case
    assert _tile(max(lengths), head_dim, dtype) == tile
    total = sum(lengths)
    token_index, rows = None, total
    if token_layout == "in_place":
        rows = total + 9
        token_index = torch.randperm(rows, device=DEVICE)[:total]
    _check(lengths, 1, head_dim, dtype, token_index=token_index, rows=rows, entry="packed")


@pytest.mark.interpret
@needs_kernel
def test_onepass_backward_is_bitwise_deterministic():
    lengths = [1, 63, 98, 128, 0]
    assert _tile(max(lengths), 64, torch.bfloat16) == 128
    token_index = torch.randperm(300, device=DEVICE)[: sum(lengths)]
    qkv = torch.randn(300, 3, 2, 64, device=DEVICE).to(torch.bfloat16).requires_grad_()
    out = partition_attention_qkvpacked(qkv, _cu(lengths), max(lengths), token_index,
                                        impl="triton")
    dout = torch.randn_like(out)
    (first,) = torch.autograd.grad(out, qkv, dout, retain_graph=True)
    (second,) = torch.autograd.grad(out, qkv, dout)
    assert torch.equal(first, second)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("max_seqlen", [0, 9])
@pytest.mark.parametrize("path", ["one_pass", "two_kernel"])
@pytest.mark.parametrize("token_layout", ["packed", "in_place"])
def test_understated_max_seqlen_still_computes_every_row(monkeypatch, max_seqlen, path,
                                                         token_layout):
    # max_seqlen only sizes the grid and picks the backward: segments longer than it (value
    # checks off, as on CUDA by default) still get every row of every output right.
    from spcl_fast.kernels import partition_attention as pa

    if path == "two_kernel":
        monkeypatch.setattr(pa, "onepass_tile", lambda *args: 0)
    assert bool(pa.onepass_tile(max_seqlen, 16, torch.float32)) == (path == "one_pass")
    lengths = [40, 3, 0, 21]
    total = sum(lengths)
    rows = total if token_layout == "packed" else total + 5
    token_index = None if token_layout == "packed" else torch.randperm(rows, device=DEVICE)[:total]
    cu, scale = _cu(lengths), 0.25
    qkv = torch.randn(rows, 3, 2, 16, device=DEVICE)
    dout = torch.randn(rows, 2, 16, device=DEVICE)
    out, lse = pa.partition_attention_qkvpacked_fwd(qkv, cu, max_seqlen, token_index, scale)
    dqkv = pa.partition_attention_qkvpacked_bwd(dout, qkv, out, lse, cu, max_seqlen, token_index,
                                                scale)
    out_t, lse_t = partition_attention_torch_fwd(*qkv.unbind(1), cu, 40, token_index, scale)
    grads_t = partition_attention_torch_bwd(dout, *qkv.unbind(1), out_t, lse_t, cu, 40,
                                            token_index, scale)
    tol = 1e-2 if HAS_CUDA else 1e-5
    torch.testing.assert_close(out, out_t, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, lse_t, atol=tol, rtol=tol)
    torch.testing.assert_close(dqkv, torch.stack(grads_t, 1), atol=tol, rtol=tol)


MANY = 70_000  # segments: more than a grid axis other than x takes (65,535)


def _many_segments(device):
    """MANY segments, nearly all empty, a few of 1-3 tokens; (cu_seqlens, lengths)."""
    lengths = torch.zeros(MANY, dtype=torch.int32)
    lengths[::997] = 3
    lengths[1::1999] = 1
    lengths[-1] = 2
    cu = torch.zeros(MANY + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return cu.to(device), lengths.tolist()


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("max_seqlen", [3, 100, 200])
def test_grids_take_any_number_of_segments(max_seqlen):
    # Every launch (forward, one-pass or two-kernel backward) has a flat grid: segments live in
    # axis x (up to 2^31 - 1 programs), not in y or z (65,535). Recorded on meta tensors: the
    # interpreter takes minutes to run MANY programs (the slow test below runs them).
    from spcl_fast.kernels.aot import recording
    from spcl_fast.kernels.partition_attention import (
        partition_attention_qkvpacked_bwd,
        partition_attention_qkvpacked_fwd,
    )

    cu = torch.empty(MANY + 1, dtype=torch.int32, device="meta")
    qkv = torch.empty(MANY * 2, 3, 2, 64, dtype=torch.bfloat16, device="meta")
    with recording() as launches:
        out, lse = partition_attention_qkvpacked_fwd(qkv, cu, max_seqlen, None, 0.125)
        partition_attention_qkvpacked_bwd(out, qkv, out, lse, cu, max_seqlen, None, 0.125)
    assert len(launches) == (2 if _tile(max_seqlen, 64, torch.bfloat16) else 4)
    for launch in launches:
        grid = launch.grid({"BLOCK_M": 16, "BLOCK_N": 16}) if callable(launch.grid) else launch.grid
        assert all(n <= 65_535 for n in grid[1:]), (launch.kernel, grid)
        assert grid[0] < 2**31


def test_many_segments_torch_path():
    # The PyTorch path at MANY segments, against the reference, values and d(qkv).
    cu, lengths = _many_segments("cpu")
    total = sum(lengths)
    qkv = torch.randn(total, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    out = partition_attention_qkvpacked(qkv, cu, max(lengths), impl="torch")
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    q, k, v = qkv.unbind(1)
    want = _reference(q, k, v, dout, cu, None, 8**-0.5, torch.float64, True, chunk_segments=7000)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(dqkv, torch.stack(want[1:], 1))


@pytest.mark.slow
@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("max_seqlen", [3, 200])  # one-pass and two-kernel backward
def test_many_segments_triton_at_one_head(max_seqlen):
    # The Triton kernels at MANY segments (one head, fp32, in place): every segment's rows and
    # gradients as the PyTorch path gives them. The interpreter runs each of the MANY programs
    # (minutes), hence slow: `python -m pytest -m slow -k many_segments_triton`.
    cu, lengths = _many_segments(DEVICE)
    total = sum(lengths)
    qkv = torch.randn(total + 5, 3, 1, 16, device=DEVICE, requires_grad=True)
    token_index = torch.randperm(total + 5, device=DEVICE)[:total]
    out = partition_attention_qkvpacked(qkv, cu, max_seqlen, token_index, impl="triton")
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    want = partition_attention_qkvpacked(qkv, cu, max_seqlen, token_index, impl="torch")
    (want_dqkv,) = torch.autograd.grad(want, qkv, dout)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv, want_dqkv, atol=1e-5, rtol=1e-5)


@pytest.mark.interpret
@needs_kernel
def test_compile_traces_one_graph():
    # The op is a torch.library custom op: dynamo traces it (fake impl) without a graph break,
    # and the compiled forward and backward run the same kernels as eager.
    def loss(qkv, cu_seqlens, max_seqlen, token_index):
        q, k, v = qkv.unbind(1)
        out = partition_attention(q, k, v, cu_seqlens, max_seqlen, token_index, impl="triton")
        return out.square().sum()

    torch._dynamo.reset()
    qkv = torch.randn(24, 3, 2, 16, device=DEVICE, requires_grad=True)
    token_index = torch.randperm(24, device=DEVICE)[:19]
    args = (qkv, _cu([7, 12]), 12, token_index)
    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    (want,) = torch.autograd.grad(loss(*args), qkv)
    (got,) = torch.autograd.grad(compiled(*args), qkv)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.interpret
@needs_kernel
def test_clear_errors(monkeypatch):
    monkeypatch.setenv("SPCL_FAST_CHECKS", "1")  # value checks run on CUDA only when asked
    cu = _cu([3, 5])
    q, k, v = torch.randn(3, 8, 2, 16, device=DEVICE).unbind(0)

    def call(q=q, k=k, v=v, cu=cu, max_seqlen=5, token_index=None):
        return partition_attention(q, k, v, cu, max_seqlen, token_index=token_index, impl="triton")

    for head_dim in (8, 136):
        small = torch.randn(8, 2, head_dim, device=DEVICE)
        with pytest.raises(ValueError, match=rf"Dh={head_dim}"):
            call(small, small, small)
    with pytest.raises(TypeError, match="q must be one of"):
        call(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="cu_seqlens"):
        call(cu=cu.long())
    with pytest.raises(ValueError, match="unit stride"):
        wide = torch.randn(8, 2, 32, device=DEVICE)[..., ::2]
        call(wide, k, v)
    with pytest.raises(ValueError, match="max_seqlen"):
        call(max_seqlen=4)
    with pytest.raises(TypeError, match="token_index"):
        call(token_index=torch.arange(8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="token_index values"):
        call(token_index=torch.arange(1, 9, device=DEVICE))
    with pytest.raises(ValueError, match="same shape"):
        call(k=k[:, :1])


# ---------------------------------------------------------------------------------------------
# gpu tier

VIT_CASES = [
    # (images, tokens per image, heads, head_dim, ratio_range)
    (1, 196, 12, 64, None),
    (8, 196, 12, 64, (0.3, 0.7)),
    (64, 196, 12, 64, None),
    (64, 196, 12, 64, (0.3, 0.7)),
    (16, 196, 12, 72, (0.3, 0.7)),
    (16, 196, 16, 128, None),
    (2, 1024, 12, 64, (0.3, 0.7)),  # 512 px: segments of 300-700 tokens
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("token_layout", ["packed", "in_place"])
@pytest.mark.parametrize("case", VIT_CASES, ids=lambda c: "x".join(map(str, c[:4])) + (
    "-ragged" if c[4] else ""))
def test_gpu_vit_shapes(dtype, token_layout, case):
    images, tokens, heads, head_dim, ratio_range = case
    gen = torch.Generator().manual_seed(images * tokens + head_dim)
    plan = sample_partitions(images, tokens, ratio_range=ratio_range, keep=0.9,
                             generator=gen).to(DEVICE)
    if token_layout == "packed":
        _check(plan.cu_seqlens, heads, head_dim, dtype, chunk_segments=16)
    else:
        _check(plan.cu_seqlens, heads, head_dim, dtype, token_index=plan.token_index,
               rows=images * tokens, chunk_segments=16)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [24, 40, 72, 96])
def test_gpu_fp32_odd_head_dims(head_dim):
    _check(RAGGED * 3, 4, head_dim, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [8, 160])
def test_gpu_auto_runs_head_dims_outside_the_kernel_in_pytorch(head_dim):
    plan = sample_partitions(4, 49, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q, k, v = torch.randn(3, 4 * 49, 2, head_dim, device=DEVICE).unbind(0)
    out = partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.token_index)
    want = partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.token_index,
                               impl="torch")
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="supports head_dim"):
        partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.token_index,
                            impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["separate", "packed"])
def test_gpu_many_segments(entry):
    cu, _ = _many_segments(DEVICE)
    _check(cu, 2, 32, torch.bfloat16, chunk_segments=7000, entry=entry)


@pytest.mark.gpu
def test_gpu_long_segment():
    _check([1100, 3, 700], 2, 64, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("token_layout", ["packed", "in_place"])
def test_gpu_backward_bitwise_reruns(token_layout):
    plan = sample_partitions(64, 196, ratio_range=(0.3, 0.7),
                             generator=torch.Generator().manual_seed(0)).to(DEVICE)
    token_index = plan.token_index if token_layout == "in_place" else None
    rows = 64 * 196 if token_layout == "in_place" else plan.total_tokens
    _, (q, k, v) = _qkv(rows, 12, 64, torch.bfloat16)
    out = partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, token_index,
                              impl="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(50):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_no_host_sync(monkeypatch):
    monkeypatch.delenv("SPCL_FAST_CHECKS", raising=False)  # opt-in value checks do sync
    plan = sample_partitions(8, 196, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    _, (q, k, v) = _qkv(8 * 196, 12, 64, torch.bfloat16)

    def step():
        out = partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.token_index,
                                  impl="triton")
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    step()  # autotuning benchmarks (and syncs) on the first call only
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _TinyBlock(torch.nn.Module):
    """LayerNorm + qkv + partition attention + proj, in the in-place layout."""

    def __init__(self, dim: int = 192, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens, max_seqlen: int, token_index):
        rows, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(rows, 3, self.heads, dim // self.heads)
        q, k, v = qkv.unbind(1)
        out = partition_attention(q, k, v, cu_seqlens, max_seqlen, token_index, impl="triton")
        return x + self.proj(out.reshape(rows, dim))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    torch.manual_seed(0)
    block = _TinyBlock().to(DEVICE)
    plan = sample_partitions(4, 196, keep=0.9, generator=torch.Generator().manual_seed(0))
    plan = plan.to(DEVICE)
    x = torch.randn(4 * 196, 192, device=DEVICE, requires_grad=True)
    args = (plan.cu_seqlens, plan.max_seqlen, plan.token_index)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = block(x, *args)
    (grad_eager,) = torch.autograd.grad(eager.float().square().sum(), x)
    compiled = torch.compile(block, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        traced = compiled(x, *args)
    (grad_traced,) = torch.autograd.grad(traced.float().square().sum(), x)
    torch.testing.assert_close(traced.float(), eager.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(grad_traced, grad_eager, atol=5e-2, rtol=5e-2)
