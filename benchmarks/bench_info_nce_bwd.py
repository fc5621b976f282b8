"""InfoNCE's backward launcher in each design, beside the cost model's bound (suite
``info_nce_bwd``).

The launcher ``spcl_fast.kernels.info_nce.info_nce_bwd`` of CLIP's symmetric loss in bf16,
forced to each design (``design="stored"``: ``G`` per row chunk, then matmuls over it, the
baseline; ``design="recompute"``: the rows and key-side kernels recompute the logits), at the
widths where the launcher can take either. The statistics are computed once outside the timed
call. Each row records the bound of its design on the device's machine
(``spcl_fast.kernels.cost.info_nce_bwd_bounds``) and the design the launcher takes there, so
one GPU call says whether the cost model's choice is the faster one. CUDA only: the rows skip
with a reason on CPU.
"""

from __future__ import annotations

import pytest
import torch
from common import run

from spcl_fast import flops

TEMPERATURE = 0.07
SIZES = [16384, 65536]
DIMS = [64, 128]
DESIGNS = ["stored", "recompute"]
CASES = [(m, d, design) for m in SIZES for d in DIMS for design in DESIGNS]


@pytest.mark.parametrize("m,d,design", CASES,
                         ids=[f"cuda-bf16-M{m}-d{d}-{design}" for m, d, design in CASES])
def test_info_nce_bwd_designs(benchmark, m, d, design):
    if not torch.cuda.is_available():
        pytest.skip("GPU row: needs CUDA")
    from spcl_fast.kernels import cost
    from spcl_fast.kernels.info_nce import info_nce_bwd, info_nce_fwd, machine_of

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    za, zb = (torch.randn(m, d, generator=g).to(device, torch.bfloat16) for _ in range(2))
    scale = 1.0 / TEMPERATURE
    row, _, col, inv_a, inv_b = info_nce_fwd(za, zb, scale, col_lse=True)
    weights = (torch.full_like(row, 0.5 / m), torch.full_like(col, 0.5 / m),
               torch.full_like(row, -1.0 / m))

    def step():
        info_nce_bwd(za, zb, inv_a, inv_b, row, col, *weights, scale, design=design)

    step()  # compile (and autotune) outside the measurement
    machine = machine_of(device)
    bounds = cost.info_nce_bwd_bounds(m, m, d, torch.bfloat16, True, machine)
    run(benchmark, step, suite="info_nce_bwd", group=f"M={m} d={d} bf16 bwd",
        provider=f"spcl_fast triton {design}", device=device,
        flops=flops.info_nce_bwd_flops(m, m, d), items=m, item_name="pairs",
        baseline=design == "stored", m=m, d=d, dtype="bf16", design=design,
        cost_model_machine=machine, bound_us=bounds[design] * 1e6,
        launcher_takes=cost.info_nce_bwd_design(m, m, d, torch.bfloat16, True, machine))
