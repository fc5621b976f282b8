"""The public partition_attention op on its PyTorch path: values, gradients, layouts,
FLOP counting, torch.compile and input validation."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spcl_fast import partition_attention, partition_attention_qkvpacked, sample_partitions
from spcl_fast.flops import attention_bwd_flops, attention_flops
from spcl_fast.reference import partition_attention_ref


def _qkv(rows, h, d, dtype=torch.float64, requires_grad=True):
    qkv = torch.randn(rows, 3, h, d, dtype=dtype)
    return qkv.requires_grad_(requires_grad)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


CASES = [
    # (segment lengths, heads, head dim)
    ([5, 3], 2, 8),
    ([0, 1, 7, 0, 2], 3, 5),
    ([1], 1, 16),
    ([13, 4, 9, 1], 2, 24),
]


@pytest.mark.parametrize("lengths,h,d", CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_reference_values_and_grads(lengths, h, d, inplace):
    total = sum(lengths)
    rows = total + (4 if inplace else 0)
    token_index = torch.randperm(rows)[:total] if inplace else None
    qkv = _qkv(rows, h, d)
    q, k, v = qkv.unbind(1)  # strided views
    cu = _cu(lengths)
    out = partition_attention(q, k, v, cu, max(lengths), token_index, impl="torch")
    ref = partition_attention_ref(q, k, v, cu, token_index)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    (g_out,) = torch.autograd.grad(out, qkv, grad)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad)
    torch.testing.assert_close(g_out, g_ref)
    if inplace:  # rows in no segment: zero output, zero gradient
        absent = torch.ones(rows, dtype=torch.bool)
        absent[token_index] = False
        assert (out[absent] == 0).all() and (g_out[absent] == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_qkvpacked_matches_separate_entry(inplace):
    # One (R, 3, H, Dh) gradient from the packed op's own backward, equal to what autograd
    # stacks from the separate entry's three; zeros in rows of no segment.
    lengths, h, d = [13, 0, 4, 1], 2, 8
    total = sum(lengths)
    rows = total + (5 if inplace else 0)
    token_index = torch.randperm(rows)[:total] if inplace else None
    qkv = _qkv(rows, h, d)
    cu = _cu(lengths)
    packed = partition_attention_qkvpacked(qkv, cu, 13, token_index, impl="torch")
    separate = partition_attention(*qkv.unbind(1), cu, 13, token_index, impl="torch")
    torch.testing.assert_close(packed, separate)
    grad = torch.randn_like(packed)
    (g_packed,) = torch.autograd.grad(packed, qkv, grad)
    (g_separate,) = torch.autograd.grad(separate, qkv, grad)
    torch.testing.assert_close(g_packed, g_separate)
    if inplace:
        absent = torch.ones(rows, dtype=torch.bool)
        absent[token_index] = False
        assert (g_packed[absent] == 0).all()


def test_qkvpacked_gradcheck_and_compile():
    plan = sample_partitions(2, 6, keep=0.7, generator=torch.Generator().manual_seed(0))
    qkv = _qkv(12, 2, 4)

    def f(qkv):
        return partition_attention_qkvpacked(qkv, plan.cu_seqlens, plan.max_seqlen,
                                             plan.token_index, impl="torch")

    assert torch.autograd.gradcheck(f, (qkv,))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (want,) = torch.autograd.grad(f(qkv).square().sum(), qkv)
    (got,) = torch.autograd.grad(compiled(qkv).square().sum(), qkv)
    torch.testing.assert_close(got, want)


def test_qkvpacked_bad_shape():
    with pytest.raises(ValueError, match=r"qkv must be a \(rows, 3, heads, head_dim\)"):
        partition_attention_qkvpacked(torch.randn(6, 2, 2, 8), _cu([6]), 6)


def test_gradcheck_inplace():
    plan = sample_partitions(2, 6, keep=0.7, generator=torch.Generator().manual_seed(0))
    qkv = _qkv(12, 2, 4)

    def f(qkv):
        q, k, v = qkv.unbind(1)
        return partition_attention(
            q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.token_index, impl="torch"
        )

    assert torch.autograd.gradcheck(f, (qkv,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp64(dtype):
    lengths = [7, 0, 11, 1]
    cu = _cu(lengths)
    qkv = torch.randn(sum(lengths), 3, 2, 16, dtype=torch.float64)
    q, k, v = qkv.to(dtype).unbind(1)
    out = partition_attention(q, k, v, cu, 11, impl="torch")
    assert out.dtype == dtype
    gt = partition_attention_ref(*qkv.unbind(1), cu)
    ref_lp = partition_attention_ref(q, k, v, cu, upcast=False)
    err = (out.double() - gt).abs().max()
    err_lp = (ref_lp.double() - gt).abs().max()
    assert err <= 2 * err_lp + 1e-6


def test_packed_and_inplace_layouts_agree():
    b, n, h, d = 3, 12, 2, 8
    plan = sample_partitions(b, n, keep=0.75, generator=torch.Generator().manual_seed(1))
    qkv = _qkv(b * n, h, d)
    q, k, v = qkv.unbind(1)
    inplace = partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.token_index)
    packed_qkv = qkv[plan.token_index]
    packed = partition_attention(*packed_qkv.unbind(1), plan.cu_seqlens, plan.max_seqlen)
    torch.testing.assert_close(inplace[plan.token_index], packed)
    grad = torch.randn_like(packed)
    g_packed = torch.autograd.grad(packed, qkv, grad)[0]
    full_grad = torch.zeros_like(inplace)
    full_grad[plan.token_index] = grad
    g_inplace = torch.autograd.grad(inplace, qkv, full_grad)[0]
    torch.testing.assert_close(g_inplace, g_packed)


def test_one_segment_equals_full_attention():
    n, h, d = 9, 3, 8
    qkv = _qkv(n, h, d, requires_grad=False)
    q, k, v = qkv.unbind(1)
    out = partition_attention(q, k, v, _cu([n]), n, softmax_scale=0.2)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=0.2
    ).transpose(0, 1)
    torch.testing.assert_close(out, dense)


def test_flop_counter_counts_the_formula():
    lengths = [5, 3, 0, 8]
    h, d = 2, 8
    qkv = _qkv(sum(lengths), h, d, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = partition_attention(*qkv.unbind(1), _cu(lengths), 8)
        out.sum().backward()
    expected = attention_flops(lengths, h, d) + attention_bwd_flops(lengths, h, d)
    assert counter.get_total_flops() == expected
    with FlopCounterMode(display=False) as packed:
        partition_attention_qkvpacked(qkv, _cu(lengths), 8).sum().backward()
    assert packed.get_total_flops() == expected
    assert attention_flops(lengths, h, d) == 4 * (25 + 9 + 64) * h * d


def test_torch_compile_fullgraph():
    plan = sample_partitions(2, 8, generator=torch.Generator().manual_seed(0))
    qkv = torch.randn(16, 3, 2, 8)

    def f(qkv):
        q, k, v = qkv.unbind(1)
        return partition_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.token_index)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(qkv), f(qkv))


def test_torch_compile_fullgraph_across_plans_of_other_lengths():
    """Plans whose max_seqlen and token count change per step (ratio_range, keep) recompile
    with symbolic sizes: the checks must not break the graph (their messages are built only on
    failure)."""
    torch._dynamo.reset()
    qkv = torch.randn(32, 3, 2, 8, requires_grad=True)

    def f(qkv, cu_seqlens, max_seqlen, token_index):
        q, k, v = qkv.unbind(1)
        return partition_attention(q, k, v, cu_seqlens, max_seqlen, token_index)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    lengths = set()
    for seed in range(4):
        plan = sample_partitions(2, 16, ratio_range=(0.2, 0.8), keep=0.75,
                                 generator=torch.Generator().manual_seed(seed))
        lengths.add((plan.max_seqlen, plan.token_index.numel()))
        args = (plan.cu_seqlens, plan.max_seqlen, plan.token_index)
        out = compiled(qkv, *args)
        (grad,) = torch.autograd.grad(out.square().sum(), qkv)
        want = f(qkv, *args)
        (want_grad,) = torch.autograd.grad(want.square().sum(), qkv)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(grad, want_grad)
    assert len(lengths) > 1  # the plans did differ


def test_impl_switch(monkeypatch):
    qkv = torch.randn(4, 3, 1, 8)
    cu = _cu([4])
    with pytest.raises(ValueError, match="impl"):
        partition_attention(*qkv.unbind(1), cu, 4, impl="cuda")
    monkeypatch.setenv("SPCL_FAST_IMPL", "bogus")
    with pytest.raises(ValueError, match="SPCL_FAST_IMPL"):
        partition_attention(*qkv.unbind(1), cu, 4)
    monkeypatch.setenv("SPCL_FAST_IMPL", "torch")
    partition_attention(*qkv.unbind(1), cu, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        partition_attention(*qkv.unbind(1), cu, 4, impl="triton")


def _bad_inputs():
    q = torch.randn(6, 2, 8)
    cu = _cu([4, 2])
    yield dict(q=q.double().half().to(torch.int32)), TypeError, "q must be one of"
    yield dict(k=torch.randn(6, 2, 4)), ValueError, "same shape"
    yield dict(v=torch.randn(6, 2, 8, dtype=torch.float64)), ValueError, "share a dtype"
    yield dict(q=torch.randn(6, 8, 2).transpose(1, 2)), ValueError, "unit stride"
    yield dict(q=torch.randn(6, 16)), ValueError, "q must be a"
    yield dict(cu_seqlens=cu.long()), TypeError, "cu_seqlens must be one of int32"
    yield dict(cu_seqlens=torch.tensor([1, 4, 6], dtype=torch.int32)), ValueError, "start at 0"
    yield (
        dict(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32)),
        ValueError,
        "non-decreasing",
    )
    yield (
        dict(cu_seqlens=torch.tensor([0, 4, 5], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens\[-1\]",
    )
    yield dict(max_seqlen=3), ValueError, "max_seqlen"
    yield dict(max_seqlen=4.0), ValueError, "max_seqlen"
    yield (
        dict(token_index=torch.arange(6, dtype=torch.int32)),
        TypeError,
        "token_index must be one of int64",
    )
    yield dict(token_index=torch.tensor([0, 1, 2, 3, 4, 6])), ValueError, "token_index values"
    yield dict(token_index=torch.tensor([0, 1, 2, 3, 4, 4])), ValueError, "repeat"
    yield dict(softmax_scale=-1.0), ValueError, "softmax_scale"
    yield dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be positive and finite"
    z = torch.randn(6, 2, 0)
    yield dict(q=z, k=z, v=z), ValueError, "head_dim"
    yield dict(q=q.numpy()), ValueError, "q must be a \\(rows, heads, head_dim\\) tensor"
    # Another device (meta stands in for a GPU here): named, before any kernel launch.
    yield dict(k=torch.randn(6, 2, 8, device="meta")), ValueError, "one device"
    yield dict(cu_seqlens=_cu([4, 2]).to("meta")), ValueError, "one device"


@pytest.mark.parametrize("override,exc,match", list(_bad_inputs()))
def test_bad_inputs_raise_clear_errors(override, exc, match):
    args = dict(
        q=torch.randn(6, 2, 8),
        k=torch.randn(6, 2, 8),
        v=torch.randn(6, 2, 8),
        cu_seqlens=_cu([4, 2]),
        max_seqlen=4,
        token_index=None,
        softmax_scale=None,
    )
    args.update(override)
    with pytest.raises(exc, match=match):
        partition_attention(**args, impl="torch")
