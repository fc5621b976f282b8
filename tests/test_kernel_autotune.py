"""Autotuned launches under the interpreter: the tuner benchmarks every candidate, keeps one per
key (head dim, max_seqlen bucket, layout and dtype for attention; problem size and variant for
InfoNCE), and reruns with the chosen config are bitwise identical.

Under the interpreter the kernels carry one small config (kernels/_common.py); these tests give
them two and a CPU stopwatch as the benchmark, so the tuning logic itself runs.
"""

from __future__ import annotations

import importlib
import time

import pytest
import torch
import triton
from kernel_helpers import DEVICE, needs_kernel, poison_outputs  # noqa: F401 (a fixture)

from spcl_fast import info_nce, partition_attention
from spcl_fast.reference import info_nce_ref, partition_attention_ref

pytestmark = [pytest.mark.interpret, needs_kernel, pytest.mark.usefixtures("poison_outputs")]


def _stopwatch(kernel_call, quantiles):
    start = time.perf_counter()
    kernel_call()
    return [time.perf_counter() - start] * len(quantiles)


def _tune(monkeypatch, kernels, candidates):
    """Give each autotuned kernel these candidates, an empty cache and the stopwatch."""
    configs = [triton.Config(meta, num_warps=1, num_stages=1) for meta in candidates]
    for kernel in kernels:
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_do_bench", _stopwatch)
    return configs


def _grads(fn, *inputs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out)))


def test_partition_attention_tunes_per_key(monkeypatch):
    from spcl_fast.kernels import partition_attention as pa

    # max_seqlen 33 would take the one-pass backward, which has a fixed config per tile.
    monkeypatch.setattr(pa, "onepass_tile", lambda *args: 0)
    kernels = (pa._fwd_kernel, pa._bwd_dkdv_kernel, pa._bwd_dq_kernel)
    configs = _tune(monkeypatch, kernels, [{"BLOCK_M": 16, "BLOCK_N": 16},
                                           {"BLOCK_M": 32, "BLOCK_N": 16}])
    lengths = [0, 19, 7, 33]
    cu = torch.tensor([0, 0, 19, 26, 59], dtype=torch.int32, device=DEVICE)
    q, k, v = torch.randn(3, 59, 2, 24, device=DEVICE)
    token_index = torch.randperm(64, device=DEVICE)[:59]
    qi, ki, vi = (torch.randn(64, 2, 24, device=DEVICE) for _ in range(3))

    def packed(q, k, v):
        return partition_attention(q, k, v, cu, max(lengths), impl="triton")

    def in_place(q, k, v):
        return partition_attention(q, k, v, cu, max(lengths), token_index, impl="triton")

    first = _grads(packed, q, k, v)
    for kernel in kernels:
        assert kernel.best_config in configs
        assert len(kernel.cache) == 1
    for _ in range(2):
        for a, b in zip(first, _grads(packed, q, k, v), strict=True):
            assert torch.equal(a, b)
    _grads(in_place, qi, ki, vi)  # the in-place layout is a key of its own
    for kernel in kernels:
        assert len(kernel.cache) == 2
        (packed_key, in_place_key) = kernel.cache
        assert packed_key[:3] == (24, 64, False) and in_place_key[:3] == (24, 64, True)
        assert "torch.float32" in packed_key

    gt = partition_attention_ref(q.double(), k.double(), v.double(), cu)
    torch.testing.assert_close(first[0], gt.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("design", ["stored", "recompute"])
def test_info_nce_tunes_per_problem(monkeypatch, design):
    from spcl_fast.kernels import info_nce as kn

    op = importlib.import_module("spcl_fast.ops.info_nce")  # the module, not the function

    # Both backward designs (the cost model picks one per problem): the stored-G one's gemm
    # kernel and the chunks that accumulate into dzk, or the recompute one's key-side kernel.
    monkeypatch.setattr(op, "bwd_design", lambda *args: design)
    tuned = {
        kn._fwd_kernel: _tune(monkeypatch, (kn._fwd_kernel,), [{"BLOCK_N": 16}, {"BLOCK_N": 32}]),
        kn._bwd_rows_kernel: _tune(monkeypatch, (kn._bwd_rows_kernel,),
                                   [{"BLOCK_M": 16, "BLOCK_N": 32},
                                    {"BLOCK_M": 32, "BLOCK_N": 32}]),
    }
    if design == "stored":
        tuned[kn._gemm_kernel] = _tune(monkeypatch, (kn._gemm_kernel,),
                                       [{"BLOCK_O": 16, "BLOCK_R": 32},
                                        {"BLOCK_O": 32, "BLOCK_R": 32}])
    else:
        tuned[kn._bwd_cols_kernel] = _tune(monkeypatch, (kn._bwd_cols_kernel,),
                                           [{"BLOCK_N": 16, "BLOCK_M": 32},
                                            {"BLOCK_N": 32, "BLOCK_M": 32}])
    za, zb = torch.randn(2, 45, 40, device=DEVICE)

    def loss(a, b, negatives):
        return info_nce(a, b, 0.1, symmetric=True, negatives=negatives, impl="triton")

    for variants, negatives in enumerate(("cross", "all"), start=1):
        # NT-Xent's 90 rows take two backward chunks: the second accumulates into dzk's fp32
        # buffer, which the tuner must restore between its trial runs.
        first = _grads(lambda a, b, n=negatives: loss(a, b, n), za, zb)
        for kernel, configs in tuned.items():
            assert kernel.best_config in configs
            assert len(kernel.cache) == variants  # one choice per problem and variant
        for _ in range(2):
            again = _grads(lambda a, b, n=negatives: loss(a, b, n), za, zb)
            for a, b in zip(first, again, strict=True):
                assert torch.equal(a, b)
        want = _grads(lambda a, b, n=negatives: info_nce_ref(a, b, 0.1, True, n), za.double(),
                      zb.double())
        for a, b in zip(first, want, strict=True):
            torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5)
