"""The Triton InfoNCE kernels against the fp64 reference (docs/architecture.md §5).

``interpret`` tier: tiny shapes through the public op with ``impl="triton"``: on CPU tensors
under ``TRITON_INTERPRET=1`` (tests/conftest.py turns it on without CUDA), on CUDA tensors where
there is a GPU. Interpreter blocks are 32 wide and its backward chunks 64 rows, so M = 37 (74
rows for NT-Xent) spans several row and column blocks and two chunks of G; rows up to 64 wide
stay resident, so d = 70 and 1000 take the streamed path (feature chunks of 32, both gradients
from matmuls over G). At resident widths the backward runs in the design the cost model picks;
the design tests force each (``stored`` G, ``recompute``) through the public op and the
launcher. Odd widths (1, 7, 33, 1000: padded to a multiple of 16), excluded pairs
(``groups``) and two gloo processes of ``gather_distributed``.
``gpu`` tier: bf16, large M, all dtypes and feature sizes, groups, determinism, torch.compile,
memory.

Pass rule (flash-attention's): ``err(kernel, gt) <= 2 * err(ref_lp, gt) + tol`` for the loss and
both gradients, where ``gt`` is :func:`info_nce_ref` in fp64 on the same (rounded) inputs,
``ref_lp`` the same reference computed in the test dtype, and ``err`` the max abs difference.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import (  # noqa: F401 (poison_outputs, bf16_dot_in_interpreter: fixtures)
    DEVICE,
    bf16_dot_in_interpreter,
    max_err,
    needs_kernel,
    poison_outputs,
    reference_precision,
)

from spcl_fast import info_nce
from spcl_fast.reference.info_nce import (
    info_nce_chunked_bwd,
    info_nce_chunked_fwd,
    info_nce_ref,
)

MODES = [("cross", True), ("cross", False), ("all", True), ("all", False)]
MODE_IDS = [f"{n}-{'sym' if s else 'asym'}" for n, s in MODES]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

pytestmark = pytest.mark.usefixtures("poison_outputs", "bf16_dot_in_interpreter")


def _inputs(m, d, dtype, seed=0, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    zb = 0.6 * za + 0.8 * torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    return za.to(device=device, dtype=dtype), zb.to(device=device, dtype=dtype)


def _run(fn, za, zb):
    za, zb = za.detach().requires_grad_(), zb.detach().requires_grad_()
    loss = fn(za, zb)
    ga, gb = torch.autograd.grad(loss, (za, zb))
    return loss.detach(), ga, gb


def _check(za, zb, temperature, symmetric, negatives, dtype, kernel=None, groups=None):
    """Apply the pass rule to the kernel's loss and gradients; returns the kernel's results."""
    kernel = kernel or (lambda a, b: info_nce(a, b, temperature, symmetric, negatives,
                                              impl="triton", groups=groups))

    def ref(a, b):
        return info_nce_ref(a, b, temperature, symmetric, negatives, groups)

    got = _run(kernel, za, zb)
    gt = _run(ref, za.double(), zb.double())
    with reference_precision(dtype):
        ref_lp = _run(ref, za, zb)
    for name, g, w, lp in zip(("loss", "dz_a", "dz_b"), got, gt, ref_lp, strict=True):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err, err_lp = max_err(g, w), max_err(lp, w)
        tol = TOL[dtype] * max(1.0, w.abs().max().item())
        assert err <= 2 * err_lp + tol, f"{name}: err {err:.3g} vs ref_lp {err_lp:.3g}"
    return got


# ---------------------------------------------------------------------------------------------
# interpret tier


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("negatives,symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("m,d,temperature", [(1, 16, 0.1), (5, 33, 0.01), (13, 70, 0.1),
                                             (37, 20, 0.01)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_matches_reference(dtype, m, d, temperature, negatives, symmetric):
    za, zb = _inputs(m, d, dtype, seed=m * 100 + d)
    _check(za, zb, temperature, symmetric, negatives, dtype)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("d", [1, 7, 33, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_kernel_odd_widths(dtype, d):
    """Widths the launchers pad to a multiple of 16 (1000 also takes the streamed path and the
    G-then-matmul backward of both sides), at a batch that fills no block."""
    za, zb = _inputs(5, d, dtype, seed=d)
    for negatives, symmetric in [("cross", True), ("all", False)]:
        _check(za, zb, 0.1, symmetric, negatives, dtype)


@pytest.mark.slow
@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("m,d", [(2, 3), (31, 16), (33, 47), (65, 64), (70, 130), (9, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_kernel_sweep_slow(dtype, m, d):
    """Every mode, without and with random ids, at batches around the interpreter's blocks
    (32 rows) and chunks (64 rows) and widths around its resident limit (64)."""
    za, zb = _inputs(m, d, dtype, seed=m * 1000 + d)
    ids = torch.randint(0, max(1, m // 2), (m,), generator=torch.Generator().manual_seed(m))
    for (negatives, symmetric), groups in zip(MODES * 2, [None] * 4 + [ids.to(DEVICE)] * 4,
                                              strict=True):
        _check(za, zb, 0.07, symmetric, negatives, dtype, groups=groups)


def test_padding_gives_aligned_rows():
    from spcl_fast.kernels.info_nce import _padded

    z = torch.randn(3, 32)
    assert _padded(z) is z
    for view in (torch.randn(3, 20), torch.randn(3, 40)[:, :32], torch.randn(3, 33)[:, 1:]):
        p = _padded(view)
        assert p.shape[1] % 16 == 0 and p.stride(0) == p.shape[1] and p.data_ptr() % 16 == 0
        assert torch.equal(p[:, :view.shape[1]], view) and not p[:, view.shape[1]:].any()


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("negatives,symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("groups", ["mixed", "one-group"])
@pytest.mark.parametrize("dtype,m,d", [(torch.float32, 37, 20), (torch.bfloat16, 13, 7)],
                         ids=["fp32", "bf16"])
def test_kernel_groups_match_reference(dtype, m, d, groups, negatives, symmetric):
    """Excluded pairs: ids shared by several rows across row and column blocks next to rows
    alone in their group (int32 ids), or one id for every row (each row keeps only its
    positive: loss and gradients 0). Ids are per pair, so a row's positive always shares its."""
    rows = torch.arange(m)
    ids = torch.where(rows % 2 == 0, rows % 3, rows + m) if groups == "mixed" else 0 * rows
    ids = ids.to(torch.int32)
    za, zb = _inputs(m, d, dtype, seed=m + d)
    got = _check(za, zb, 0.05, symmetric, negatives, dtype, groups=ids.to(DEVICE))
    if groups == "one-group":
        assert all(g.abs().max() <= TOL[dtype] for g in got)


@pytest.mark.interpret
@needs_kernel
def test_kernel_gather_distributed_with_groups_two_processes(tmp_path):
    """The kernels with keys (and group ids) gathered from 2 gloo processes, every mode,
    without and with groups, against one process on the whole batch."""
    import torch.multiprocessing as mp
    from test_info_nce import W, _dist_worker

    if DEVICE == "cuda":
        pytest.skip("gloo on CPU tensors: the interpreter's case")
    mp.spawn(_dist_worker, args=(W, f"file://{tmp_path}/store", "triton"), nprocs=W, join=True)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_large_norms_and_strided_rows(dtype):
    """Rows far from unit norm (fp16 dot products beyond fp16's range, accumulated in fp32)
    and inputs whose rows are not contiguous with each other (a column slice)."""
    za, zb = _inputs(33, 45, dtype, scale=40.0)
    wide_a = torch.zeros(33, 64, dtype=dtype, device=DEVICE)
    wide_b = torch.zeros(33, 64, dtype=dtype, device=DEVICE)
    wide_a[:, :45], wide_b[:, :45] = za, zb
    for negatives in ("cross", "all"):
        def kernel(a, b, n=negatives):
            # a, b are the leaves; route them through strided views of wider buffers.
            pa = torch.nn.functional.pad(a, (0, 19))[:, :45]
            pb = torch.nn.functional.pad(b, (0, 19))[:, :45]
            assert pa.stride(0) == 64 and not pa.is_contiguous()
            return info_nce(pa, pb, 0.05, True, n, impl="triton")

        _check(za, zb, 0.05, True, negatives, dtype, kernel=kernel)


@pytest.mark.interpret
@needs_kernel
def test_kernel_and_chunked_path_agree_in_fp32():
    za, zb = _inputs(37, 70, torch.float32, seed=9)
    for negatives, symmetric in MODES:
        got = _run(lambda a, b, n=negatives, s=symmetric: info_nce(a, b, 0.01, s, n,
                                                                   impl="triton"), za, zb)
        want = _run(lambda a, b, n=negatives, s=symmetric: info_nce(a, b, 0.01, s, n,
                                                                    impl="torch"), za, zb)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# the two backward designs (kernels/info_nce.py): each forced where the launcher would choose


DESIGNS = ["stored", "recompute"]


@pytest.fixture
def force_design(monkeypatch):
    """``force(design)``: the op runs ``design`` instead of the cost model's choice."""
    op = importlib.import_module("spcl_fast.ops.info_nce")  # the module, not the function

    def force(design):
        monkeypatch.setattr(op, "bwd_design", lambda *args: design)

    return force


def _mixed_ids(m):
    rows = torch.arange(m)
    return torch.where(rows % 2 == 0, rows % 3, rows + m).to(DEVICE)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("negatives,symmetric", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype,m,d,groups", [(torch.float32, 37, 20, False),
                                              (torch.float32, 37, 45, True),
                                              (torch.bfloat16, 13, 33, True),
                                              (torch.float16, 37, 45, False)],
                         ids=["fp32", "fp32-groups", "bf16-groups", "fp16"])
def test_kernel_designs_match_reference(force_design, dtype, m, d, groups, negatives, symmetric,
                                        design):
    """Both backward designs at resident widths (odd ones padded to 48 here), every mode
    (CLIP both ways and one-sided, NT-Xent with its self mask), with and without excluded
    pairs, over several row and key blocks."""
    force_design(design)
    za, zb = _inputs(m, d, dtype, seed=m + d)
    _check(za, zb, 0.05, symmetric, negatives, dtype, groups=_mixed_ids(m) if groups else None)


def _bwd_problem(case, dtype=torch.float32):
    """Statistics and random weights of a problem beyond what a single-process loss uses: keys
    of other ranks (``key_offset``) with column statistics of a non-square problem, or NT-Xent
    positives in a rank's block (``pos_shift``, ``pos_mod``, self mask)."""
    g = torch.Generator().manual_seed(5)
    mq, mk, d, scale = 19, 57, 40, 20.0
    zq = torch.randn(mq, d, generator=g).to(DEVICE, dtype)
    zk = torch.randn(mk, d, generator=g).to(DEVICE, dtype)
    if case == "gathered-cross-col":
        args, col = (scale, 19, 0, mq, False), True
    else:
        args, col = (scale, 38, 10, 19, True), False
    stats = info_nce_chunked_fwd(zq.float(), zk.float(), *args, col_lse=col, chunk=7)
    d_row, d_pos = (torch.randn(mq, generator=g).to(DEVICE) for _ in range(2))
    d_col = torch.randn(stats[2].shape[0], generator=g).to(DEVICE)
    return zq, zk, args, col, stats, (d_row, d_col, d_pos)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("case", ["gathered-cross-col", "gathered-all"])
def test_kernel_statistics_match_chunked(case):
    """The launchers beyond what a single-process loss uses (:func:`_bwd_problem`), forward and
    both backward designs, against the chunked PyTorch twin."""
    from spcl_fast.kernels.info_nce import info_nce_bwd, info_nce_fwd

    zq, zk, args, col, want, weights = _bwd_problem(case)
    got = info_nce_fwd(zq, zk, *args, col_lse=col)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    row, _, cl, inv_q, inv_k = want
    want = info_nce_chunked_bwd(zq, zk, inv_q, inv_k, row, cl, *weights, *args, chunk=7)
    for design in DESIGNS:
        got = info_nce_bwd(zq, zk, inv_q, inv_k, row, cl, *weights, *args, design=design)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_recompute_is_deterministic_and_the_launcher_takes_the_cost_models_choice(dtype):
    """The recompute backward twice gives the same bits; without ``design`` the launcher runs
    the design :func:`cost.info_nce_bwd_design` names for the problem, bit for bit."""
    from spcl_fast.kernels import cost
    from spcl_fast.kernels.info_nce import info_nce_bwd

    from spcl_fast.ops.info_nce import bwd_design

    zq, zk, args, _, (row, _, cl, inv_q, inv_k), weights = _bwd_problem("gathered-cross-col",
                                                                        dtype)
    call = (zq, zk, inv_q, inv_k, row, cl, *weights, *args)
    first = info_nce_bwd(*call, design="recompute")
    again = info_nce_bwd(*call, design="recompute")
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    chosen = cost.info_nce_bwd_design(zq.shape[0], zk.shape[0], zq.shape[1], dtype, True, "H100")
    assert bwd_design(zq.shape[0], zk.shape[0], zq.shape[1], dtype, True,
                      torch.device("meta")) == chosen  # what the op passes the launcher
    auto = info_nce_bwd(*call, design=bwd_design(zq.shape[0], zk.shape[0], zq.shape[1], dtype,
                                                 True, zq.device))
    forced = info_nce_bwd(*call, design=chosen)
    assert all(torch.equal(a, b) for a, b in zip(auto, forced, strict=True))


@pytest.mark.interpret
@needs_kernel
def test_recompute_only_at_resident_widths():
    """Rows too wide to stay in registers take the stored G whatever the cost model says, and
    forcing the recompute design there is refused, naming the width."""
    from spcl_fast.kernels.info_nce import bwd_designs, info_nce_bwd

    from spcl_fast.ops.info_nce import bwd_design

    assert bwd_designs(33, torch.float32) == ("stored", "recompute")  # padded to 48
    assert bwd_designs(70, torch.float32) == ("stored",)  # 80: beyond the interpreter's 64
    assert bwd_design(5, 5, 80, torch.float32, True, torch.device(DEVICE)) == "stored"
    z, vec = torch.randn(5, 70, device=DEVICE), torch.ones(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"design must be one of \('stored',\) at padded "
                                         r"width 80 .*got 'recompute'"):
        info_nce_bwd(z, z, vec, vec, vec, vec, vec, vec, vec, 10.0, design="recompute")


# ---------------------------------------------------------------------------------------------
# gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d", [16, 100, 256, 1000, 4096])
def test_gpu_dtypes_and_feature_sizes(dtype, d):
    # CLIP's symmetric loss (column LSE) and one-sided NT-Xent (self mask, non-square keys);
    # the other two modes in bf16 below. Each case compiles its own kernel variants.
    m = 1000 if d < 4096 else 300
    za, zb = _inputs(m, d, dtype, seed=d)
    for negatives, symmetric in [("cross", True), ("all", False)]:
        _check(za, zb, 0.07, symmetric, negatives, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.1, 0.01])
@pytest.mark.parametrize("m", [1, 2, 129, 4097])
def test_gpu_bf16_small_and_odd_batches(m, temperature):
    za, zb = _inputs(m, 256, torch.bfloat16, seed=m)
    for negatives, symmetric in MODES:
        _check(za, zb, temperature, symmetric, negatives, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 1000])
def test_gpu_groups_bf16(d):
    """Same-patient ids, every mode: at d = 128 the rows take 3+ backward chunks of G (2048
    rows each), at d = 1000 both gradient matmuls run over the stored G."""
    m = 4099
    za, zb = _inputs(m, d, torch.bfloat16, seed=d)
    ids = torch.randint(0, m // 3, (m,), generator=torch.Generator().manual_seed(d)).to(DEVICE)
    for negatives, symmetric in MODES:
        _check(za, zb, 0.05, symmetric, negatives, torch.bfloat16, groups=ids)


@pytest.mark.gpu
@pytest.mark.parametrize("negatives", ["cross", "all"])
def test_gpu_large_batch_bf16(negatives):
    za, zb = _inputs(16384, 256, torch.bfloat16, seed=1)
    _check(za, zb, 0.05, True, negatives, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("negatives,symmetric", [("cross", True), ("all", True)])
def test_gpu_deterministic_reruns(negatives, symmetric):
    za, zb = _inputs(4099, 200, torch.bfloat16, seed=2)
    first = _run(lambda a, b: info_nce(a, b, 0.05, symmetric, negatives, impl="triton"), za, zb)
    for _ in range(49):
        again = _run(lambda a, b: info_nce(a, b, 0.05, symmetric, negatives, impl="triton"),
                     za, zb)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("design", DESIGNS)
def test_gpu_designs_match_and_repeat_bf16(force_design, design):
    """Each backward design at d = 128 (resident: the launcher may take either), same-patient
    ids, every mode, against the reference; then 10 reruns of CLIP's loss give the same bits."""
    force_design(design)
    m = 4099
    za, zb = _inputs(m, 128, torch.bfloat16, seed=7)
    ids = torch.randint(0, m // 3, (m,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    for negatives, symmetric in MODES:
        _check(za, zb, 0.05, symmetric, negatives, torch.bfloat16, groups=ids)
    first = _run(lambda a, b: info_nce(a, b, 0.05, impl="triton", groups=ids), za, zb)
    for _ in range(10):
        again = _run(lambda a, b: info_nce(a, b, 0.05, impl="triton", groups=ids), za, zb)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    za, zb = _inputs(2048, 256, torch.bfloat16, seed=3)

    def fn(a, b):
        return info_nce(a, b, 0.1, True, "cross", impl="triton") + 0.5 * info_nce(
            a, b, 0.1, True, "all", impl="triton")

    compiled = torch.compile(fn, fullgraph=True)
    got = _run(compiled, za, zb)
    want = _run(fn, za, zb)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_memory_is_bounded():
    """fwd + bwd at M = 16384, d = 256 in bf16: the extra memory is O(M d) (the gradients, fp32
    accumulators, column partials) plus the backward's G chunk of at most ``G_CHUNK_COPIES``
    times the keys' bytes, well below the 1 GiB of one fp32 M x M matrix."""
    from spcl_fast.kernels.info_nce import g_chunk_rows

    m, d = 16384, 256
    za, zb = (z.requires_grad_() for z in _inputs(m, d, torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    info_nce(za, zb, 0.1, True, "cross", impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    g_chunk = g_chunk_rows(m, m, d) * m * 2
    assert extra <= 16 * m * d * 2 + g_chunk + (1 << 20), f"{extra / 2**20:.1f} MiB"
    assert extra * 4 <= m * m * 4


@pytest.mark.gpu
def test_gpu_gather_rows_nccl(tmp_path):
    """The all-gather's NCCL branch (reduce-scatter backward) on a one-rank NCCL group; the op
    itself skips the gather at world size 1, so the autograd function is called directly."""
    import torch.distributed as dist

    from spcl_fast.ops.info_nce import _GatherRows

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        x = torch.randn(5, 7, device="cuda", requires_grad=True)
        w = torch.randn(5, 7, device="cuda")
        y = _GatherRows.apply(x)
        torch.testing.assert_close(y, x)
        (y * w).sum().backward()
        torch.testing.assert_close(x.grad, w)
        za, zb = _inputs(64, 32, torch.bfloat16)
        got = _run(lambda a, b: info_nce(a, b, 0.1, gather_distributed=True), za, zb)
        want = _run(lambda a, b: info_nce(a, b, 0.1), za, zb)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()
