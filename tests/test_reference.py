"""The references against brute force: explicit per-segment loops and explicit cross-entropy."""

import math

import pytest
import torch

from spcl_fast import sample_partitions
from spcl_fast.reference import info_nce_ref, partition_attention_ref


def brute_attention(q, k, v, cu_seqlens, token_index=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = torch.arange(q.shape[0]) if token_index is None else token_index
    out = torch.zeros_like(q)
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        seg = rows[cu[s] : cu[s + 1]].tolist()
        for h in range(q.shape[1]):
            for i in seg:
                logits = [float(q[i, h] @ k[j, h]) * scale for j in seg]
                m = max(logits)
                w = [math.exp(x - m) for x in logits]
                total = sum(w)
                out[i, h] = sum(wj / total * v[j, h] for wj, j in zip(w, seg, strict=False))
    return out


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("lengths", [[3, 1, 0, 4], [5], [0, 2, 2]])
def test_attention_ref_matches_loops(inplace, lengths):
    h, d = 2, 5
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = sum(lengths)
    if inplace:
        rows = total + 3
        token_index = torch.randperm(rows)[:total]
    else:
        rows, token_index = total, None
    q, k, v = (torch.randn(rows, h, d, dtype=torch.float64) for _ in range(3))
    expected = brute_attention(q, k, v, cu, token_index, scale=0.3)
    got = partition_attention_ref(q, k, v, cu, token_index, softmax_scale=0.3)
    torch.testing.assert_close(got, expected)


def test_attention_ref_gradcheck():
    plan = sample_partitions(2, 5, keep=0.8, generator=torch.Generator().manual_seed(0))
    q, k, v = (torch.randn(10, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: partition_attention_ref(q, k, v, plan.cu_seqlens, plan.token_index),
        (q, k, v),
    )


def brute_info_nce(a, b, tau, symmetric, negatives):
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    m = a.shape[0]

    def ce(query, keys, pos, exclude=None):
        logits = [float(query @ k) / tau for j, k in enumerate(keys) if j != exclude]
        pos_logit = float(query @ keys[pos]) / tau
        mx = max(logits)
        return -(pos_logit - mx - math.log(sum(math.exp(x - mx) for x in logits)))

    if negatives == "cross":
        loss_a = sum(ce(a[i], b, i) for i in range(m)) / m
        if not symmetric:
            return loss_a
        loss_b = sum(ce(b[i], a, i) for i in range(m)) / m
        return (loss_a + loss_b) / 2
    z = torch.cat([a, b])
    queries = range(2 * m) if symmetric else range(m)
    losses = [ce(z[i], z, (i + m) % (2 * m), exclude=i) for i in queries]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("negatives", ["cross", "all"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,d,tau", [(1, 3, 0.1), (5, 7, 0.5), (9, 4, 0.05)])
def test_info_nce_ref_matches_explicit_cross_entropy(negatives, symmetric, m, d, tau):
    a, b = torch.randn(m, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    got = info_nce_ref(a, b, tau, symmetric, negatives)
    assert got.item() == pytest.approx(brute_info_nce(a, b, tau, symmetric, negatives), rel=1e-10)


@pytest.mark.parametrize("negatives", ["cross", "all"])
def test_info_nce_ref_gradcheck(negatives):
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce_ref(a, b, 0.2, True, negatives), (a, b))
