"""InfoNCE forward + backward: the fused op against the naive dense loss (suite ``loss``).

Naive baseline: ``info_nce_ref`` (normalise, ``z_a @ z_b.T / tau``, ``F.cross_entropy`` in both
directions; what most codebases write), symmetric CLIP loss, d = 256. Providers:

* ``naive`` (baseline) on every device;
* ``spcl_fast torch-chunked`` (``impl="torch"``) on CPU: streams over column blocks;
* ``spcl_fast triton`` (``impl="triton"``) on CUDA; GPU rows skip with a reason on CPU.

M = 1K, 4K, 16K, 64K. On CPU only up to 16K (M = 64K would take minutes per call on a laptop
CPU, and the naive path's dense matrices would need ~80 GB), with a single timed round at 16K
(the profiled one).

Peak memory is the extra memory of one forward + backward over what the inputs already hold:
on CUDA ``torch.cuda.max_memory_allocated`` (``common.peak_memory_mb``); on CPU the PyTorch
profiler's allocation and free events of the CPU allocator (``profile_memory=True``), summed in
time order — every tensor storage PyTorch allocates, including inside the custom ops, and
nothing it does not (Python objects, the allocator's own slack). That profiled call doubles as
the warm-up. The chunked rows record ``memory_ratio_vs_naive`` (naive peak / ours).
"""

from __future__ import annotations

import pytest
import torch
from common import ROWS, device_name, peak_memory_mb, run

from devtools.profiling import peak_cpu_bytes
from spcl_fast import flops, info_nce
from spcl_fast.reference.info_nce import info_nce_ref

D = 256
TEMPERATURE = 0.07
SIZES = [1024, 4096, 16384, 65536]
CPU_MAX_M = 16384
NAIVE_PEAK_MB: dict[tuple, float] = {}


def _peak_cpu_mb(fn) -> float:
    return peak_cpu_bytes(fn) / 2**20


def _case(provider: str, device: str):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("GPU row: needs CUDA")
        return {"naive": "naive", "triton": "spcl_fast triton"}.get(provider)
    return {"naive": "naive", "chunked": "spcl_fast torch-chunked"}.get(provider)


CASES = [(device, dtype, m, provider)
         for device, dtypes, providers in [("cpu", ["fp32"], ["naive", "chunked"]),
                                           ("cuda", ["bf16", "fp32"], ["naive", "triton"])]
         for dtype in dtypes for m in SIZES for provider in providers]


@pytest.mark.parametrize("device,dtype_name,m,provider", CASES,
                         ids=[f"{dv}-{dt}-M{m}-{p}" for dv, dt, m, p in CASES])
def test_info_nce_fwd_bwd(benchmark, device, dtype_name, m, provider):
    name = _case(provider, device)
    if name is None:
        pytest.skip(f"{provider} is not a {device} provider")
    if device == "cpu" and m > CPU_MAX_M:
        pytest.skip(f"CPU rows stop at M = {CPU_MAX_M} (M = {m} takes minutes per call)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    za = torch.randn(m, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    zb = torch.randn(m, D, generator=g).to(device=device, dtype=dtype).requires_grad_()

    if provider == "naive":
        def loss_fn():
            return info_nce_ref(za, zb, TEMPERATURE, symmetric=True, negatives="cross")
    else:
        impl = "triton" if provider == "triton" else "torch"

        def loss_fn():
            return info_nce(za, zb, TEMPERATURE, symmetric=True, negatives="cross", impl=impl)

    def step():
        za.grad = zb.grad = None
        loss_fn().backward()

    key = (device_name(device), dtype_name, m)
    big_cpu = device == "cpu" and m >= CPU_MAX_M
    measured: list[float] = []
    if big_cpu:
        # One call only (~30 s each on a 2-core CPU): the timed round is the profiled one; the
        # profiler's per-op overhead (microseconds, ~10^3 ops) is noise next to the call.
        timed_fn, memory = (lambda: measured.append(_peak_cpu_mb(step))), None
    else:
        timed_fn = step
        try:
            if device == "cuda":
                step()  # compile outside the measurement
                memory = peak_memory_mb(step, device)
            else:
                memory = _peak_cpu_mb(step)  # also the warm-up
        except torch.cuda.OutOfMemoryError:
            pytest.skip(f"{provider} runs out of GPU memory at M = {m}")
    total_flops = flops.info_nce_flops(m, m, D) + flops.info_nce_bwd_flops(m, m, D)
    run(benchmark, timed_fn, suite="loss", group=f"M={m} d={D} {dtype_name} fwd+bwd",
        provider=name, device=device, flops=total_flops, items=m, item_name="pairs",
        baseline=provider == "naive", rounds=1 if big_cpu else (3 if device == "cpu" else 10),
        warmup=0 if device == "cpu" else 3, memory_mb=memory, m=m, d=D, dtype=dtype_name,
        temperature=TEMPERATURE, memory_method="cuda max_memory_allocated" if device == "cuda"
        else "torch.profiler CPU allocator events")
    row = ROWS["loss"][-1]
    if measured:
        row["peak_memory_mb"] = memory = measured[0]
    if provider == "naive":
        NAIVE_PEAK_MB[key] = memory
    elif NAIVE_PEAK_MB.get(key) and memory:
        row["memory_ratio_vs_naive"] = NAIVE_PEAK_MB[key] / memory
    benchmark.extra_info.update(row)
