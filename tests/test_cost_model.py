"""The cost model (``python -m spcl_fast.kernels.cost``, kernels/cost.py).

* Every counter equals what the kernel does: each launch a launcher makes at awkward shapes is
  run under the Triton interpreter with every load, store, dot and exp2 tallied (bytes of the
  unmasked lanes, ``2 M N K`` per dot of the tiles as they are, elements of each exp2, programs
  of the grid) and compared with the counter for the same launch.
* The committed table (docs/kernels.md) and JSON are what the installed code gives, and they
  keep the designs' promises.
* The occupancy rule and the roofline arithmetic on hand-checked numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import needs_kernel

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kernels.md"
SAVED = ROOT / "benchmarks" / "results" / "cost-model.json"


def _cost():
    from spcl_fast.kernels import cost

    return cost


@contextlib.contextmanager
def _tally():
    """Count, while the interpreter runs kernels, what :class:`cost.Count` counts: bytes of
    the unmasked lanes of every load and store (and of their distinct addresses), ``2 M N K``
    per dot of the tiles as they are, elements of every exp2, programs."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    tally = _cost().Count()
    loaded, stored = {}, {}  # address -> element bytes
    load, store = builder.create_masked_load, builder.create_masked_store
    dot, exp2, grid_idx = builder.create_dot, builder.create_exp2, builder.set_grid_idx

    def touch(ptrs, mask, seen):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = ptrs.data[mask.data.astype(bool)]
        seen.update(dict.fromkeys(addresses.tolist(), size))
        return addresses.size * size

    def counted_load(ptrs, mask, *args):
        tally.read += touch(ptrs, mask, loaded)
        return load(ptrs, mask, *args)

    def counted_store(ptrs, value, mask, *args):
        tally.written += touch(ptrs, mask, stored)
        return store(ptrs, value, mask, *args)

    def counted_dot(a, b, *args):
        (m, k), n = a.data.shape[-2:], b.data.shape[-1]
        tally.mma_flops += 2 * m * n * k
        return dot(a, b, *args)

    def counted_exp2(arg):
        tally.exp2 += arg.data.size
        return exp2(arg)

    def counted_program(*xyz):
        tally.programs += 1
        return grid_idx(*xyz)

    patches = {"create_masked_load": counted_load, "create_masked_store": counted_store,
               "create_dot": counted_dot, "create_exp2": counted_exp2,
               "set_grid_idx": counted_program}
    for name, fn in patches.items():
        setattr(builder, name, fn)
    try:
        yield tally
    finally:
        for name in patches:
            delattr(builder, name)  # back to the class's methods
        tally.read_unique, tally.written_unique = sum(loaded.values()), sum(stored.values())


def _check_every_launch(call, lengths):
    """Record the launches of ``call()`` (on CPU tensors: nothing runs), then run each one
    under the interpreter with the tally on, and compare with its counter."""
    from spcl_fast.kernels import aot

    cost = _cost()
    with aot.recording() as launches:
        call()
    assert launches
    for launch in launches:
        name, expected = cost.count_launch(launch, lengths)
        with _tally() as measured:
            launch.kernel[launch.grid](*launch.args, **launch.kwargs)
        assert measured == expected, (name, measured, expected)
        assert measured.read_unique <= measured.read, name
    return {cost.count_launch(launch, lengths)[0] for launch in launches}


def _attention_inputs(lengths, heads, head_dim, dtype, in_place):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    rows = total + 5 if in_place else total  # in place: 5 rows in no segment
    index = torch.randperm(rows)[:total] if in_place else None
    qkv = torch.randn(rows, 3, heads, head_dim).to(dtype)
    return qkv, cu, index


# (segment lengths, max_seqlen, head dim): one pass with empty and 1-token segments; one pass
# with an understated max_seqlen (the long path); two kernels (head dim 72 pads to 128, whose
# one-pass tiles stop at 32 rows for fp32 and 64 for 16-bit).
ONEPASS, UNDERSTATED, TWO_KERNELS = ([0, 1, 17, 16, 33, 5], 33, 24), ([40, 3], 16, 24), \
    ([70, 7, 0], 70, 72)
ATTENTION_CASES = [
    *(pytest.param(ONEPASS, dtype, in_place, id=f"onepass-{name}-{layout}")
      for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
      for in_place, layout in ((False, "packed"), (True, "in_place"))),
    pytest.param(UNDERSTATED, torch.bfloat16, False, id="understated-bf16-packed"),
    pytest.param(UNDERSTATED, torch.float32, True, id="understated-fp32-in_place"),
    pytest.param(TWO_KERNELS, torch.float32, False, id="two_kernels-fp32-packed"),
    pytest.param(TWO_KERNELS, torch.bfloat16, True, id="two_kernels-bf16-in_place"),
]


@needs_kernel
@pytest.mark.interpret
@pytest.mark.parametrize("case,dtype,in_place", ATTENTION_CASES)
def test_attention_counters_are_what_the_kernels_do(case, dtype, in_place):
    from spcl_fast.kernels import partition_attention as pa

    lengths, max_seqlen, head_dim = case
    qkv, cu, index = _attention_inputs(lengths, 2, head_dim, dtype, in_place)
    q, k, v = qkv.unbind(1)
    args = (cu, max_seqlen, index, head_dim**-0.5)
    out, lse = pa.partition_attention_fwd(q, k, v, *args)
    seen = _check_every_launch(lambda: pa.partition_attention_fwd(q, k, v, *args), lengths)
    seen |= _check_every_launch(
        lambda: pa.partition_attention_bwd(torch.randn_like(out), q, k, v, out, lse, *args),
        lengths)
    seen |= _check_every_launch(
        lambda: pa.partition_attention_qkvpacked_bwd(torch.randn_like(out), qkv, out, lse, *args),
        lengths)
    backward = "_bwd_dq_kernel" if case == TWO_KERNELS else "_bwd_onepass_kernel"
    assert {"partition_attention._fwd_kernel", f"partition_attention.{backward}"} <= seen


@needs_kernel
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [False, True], ids=["", "groups"])
@pytest.mark.parametrize("variant", ["cross", "all"])
@pytest.mark.parametrize("d", [45, 70], ids=["resident", "streamed"])  # under the interpreter
def test_info_nce_counters_are_what_the_kernels_do(d, variant, groups, dtype):
    from spcl_fast.kernels.info_nce import bwd_designs, info_nce_bwd, info_nce_fwd

    m = 37  # neither a multiple of the blocks nor d of 16
    za, zb = torch.randn(m, d).to(dtype), torch.randn(m, d).to(dtype)
    if variant == "cross":
        args, kwargs, zq, zk = (10.0,), {"col_lse": True}, za, zb
    else:  # NT-Xent over [a; b]
        z = torch.cat([za, zb])
        args, kwargs, zq, zk = (10.0, 0, m, 2 * m, True), {}, z, z
    grouped = {}
    if groups:
        ids = torch.randint(0, 9, (zq.shape[0],))
        grouped = {"groups_q": ids, "groups_k": ids if variant == "all" else ids.flip(0)}
    row, pos, col, inv_q, inv_k = info_nce_fwd(zq, zk, *args, **kwargs, **grouped)
    _check_every_launch(lambda: info_nce_fwd(zq, zk, *args, **kwargs, **grouped), [])
    grad = torch.randn_like(row)
    col_grad = torch.randn_like(col)
    seen = set()
    for design in bwd_designs(d, dtype):  # the recompute one at the resident width only
        seen |= _check_every_launch(lambda design=design: info_nce_bwd(
            zq, zk, inv_q, inv_k, row, col, grad, col_grad, torch.randn_like(pos), *args,
            **grouped, design=design), [])
    assert ("info_nce._bwd_cols_kernel" in seen) == (d == 45)


def test_occupancy_rule():
    cost = _cost()
    h100 = cost.PEAKS["H100"]
    # 255 registers, 8 warps: 8192 registers a warp, 2 warps per sub-partition: 1 CTA.
    assert cost.ctas_per_sm(h100, 255, 0, 8) == 1
    # 136 registers: 4352 a warp, 3 per sub-partition (not 15 per SM): 12 warps, 3 CTAs of 4.
    assert cost.ctas_per_sm(h100, 136, 0, 4) == 3
    # 32 registers, 4 warps: the 64-warp limit (16 CTAs) before the 32-CTA one.
    assert cost.ctas_per_sm(h100, 32, 0, 4) == 16
    # Shared memory: 80 KiB + 1 KiB reserved per CTA fits twice in 228 KiB, once in 164 KiB.
    assert cost.ctas_per_sm(h100, 32, 80 * 1024, 4) == 2
    assert cost.ctas_per_sm(cost.PEAKS["A100"], 32, 80 * 1024, 4) == 2
    assert cost.ctas_per_sm(cost.PEAKS["A100"], 32, 82 * 1024, 4) == 1


def test_bound_is_the_largest_term():
    cost = _cost()
    h100 = cost.PEAKS["H100"]
    # The memory term counts unique bytes (requested ones may hit in cache).
    step = cost.Step("k", cost.Count(read=9_000_000, read_unique=3_000_000, written_unique=350_000,
                                     mma_flops=989_000_000 * 2), "16-bit")
    terms = step.bound(h100)
    assert terms["memory"] == pytest.approx(1e-6) and terms["mma"] == pytest.approx(2e-6)
    assert terms["exp2"] == 0


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The JSON and table the installed code gives (a subprocess without the interpreter:
    the GPU configs; launches on meta tensors, nothing compiled)."""
    out = tmp_path_factory.mktemp("cost") / "cost.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "spcl_fast.kernels.cost", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout.strip()


def test_committed_table_is_what_the_code_gives(generated):
    from spcl_fast.kernels import aot

    doc, text = generated
    committed = aot.between_markers(DOC.read_text(), _cost().MARKERS)
    assert committed == text, (
        "docs/kernels.md: run python -m spcl_fast.kernels.cost --markdown docs/kernels.md")
    assert json.loads(SAVED.read_text())["rows"] == doc["rows"], (
        f"{SAVED.name}: run python -m spcl_fast.kernels.cost --json {SAVED}")


def test_every_launch_has_its_occupancy(generated):
    # The saved aot measurements cover every compile the table's launches use.
    for row in generated[0]["rows"]:
        for launch in row["launches"]:
            if not launch["name"].startswith("torch "):
                assert all(v is not None for v in launch["occupancy"].values()), (row, launch)


def _row(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, len(found))
    return found[0]


def _bytes(row: dict) -> int:
    return row["total"]["read"] + row["total"]["written"]


@pytest.mark.parametrize("layout", ["packed", "in-place"])
def test_onepass_backward_moves_at_most_half_the_bytes(generated, layout):
    # Issue 35's promise at ViT-B/16, 98-token segments: the one-pass backward into one qkv
    # gradient buffer against the two-kernel backward whose three gradients autograd stacks.
    rows, cost = generated[0]["rows"], _cost()
    common = {"op": "attention backward", "layout": layout, "size": 98}
    old = _row(rows, design=cost.OLD_BACKWARD, **common)
    new = _row(rows, design=cost.NEW_BACKWARD, **common)
    assert [launch["name"] for launch in new["launches"]] == [
        "partition_attention._bwd_onepass_kernel"]
    assert _bytes(new) <= 0.5 * _bytes(old), (_bytes(new), _bytes(old))


@pytest.mark.parametrize("rows_m", [16384, 65536])
def test_info_nce_designs_keep_their_promises(generated, rows_m):
    # CLIP's symmetric loss at d = 128, forward and backward: the stored-G backward multiplies
    # at most 1.5x the algorithmic 6 M^2 d; the recompute one at most 10/6 of it (logits twice
    # more) but moves under 5% of the stored one's unique bytes in two kernel launches; the
    # launcher's choice on an H100 is the design of the smaller bound.
    rows = generated[0]["rows"]
    forward = _row(rows, op="info_nce forward", size=rows_m, dim=128)
    stored, recompute = (_row(rows, op="info_nce backward", design=design, size=rows_m, dim=128)
                         for design in ("stored", "recompute"))
    algorithmic = 6 * rows_m**2 * 128
    assert forward["algorithmic_flops"] + stored["algorithmic_flops"] == algorithmic
    assert forward["total"]["mma_flops"] + stored["total"]["mma_flops"] <= 1.5 * algorithmic
    assert 6 * (forward["total"]["mma_flops"] + recompute["total"]["mma_flops"]) <= (
        10 * algorithmic)

    def unique(row):
        return row["total"]["read_unique"] + row["total"]["written_unique"]

    assert unique(recompute) <= 0.05 * unique(stored)
    assert [x["name"] for x in recompute["launches"] if not x["name"].startswith("torch ")] == [
        "info_nce._bwd_rows_kernel", "info_nce._bwd_cols_kernel"]
    chosen = min((stored, recompute), key=lambda r: r["bounds"]["H100"]["bound_s"])
    assert chosen["chosen"] and not (stored if chosen is recompute else recompute)["chosen"]


def test_info_nce_backward_choice_has_one_boundary_per_machine(generated):
    # The committed choice table: on each machine and M, the launcher takes the design with the
    # smaller counted bound; as d grows past the point where the extra logits matmuls outweigh
    # G's traffic it switches from recompute to the stored G once and never back, and rows
    # beyond the resident widths have the stored G only. Where the switch sits per machine is
    # what the counts say: an H100 (more FLOPs per byte) keeps recompute over every resident
    # width of 16-bit rows, an A100 switches inside them.
    choices = generated[0]["info_nce_bwd_choices"]
    assert json.loads(SAVED.read_text())["info_nce_bwd_choices"] == choices
    switches = {}
    for peak in ("H100", "A100"):
        for m in {r["M"] for r in choices}:
            row_of = sorted((r for r in choices if r["M"] == m), key=lambda r: r["d"])
            taken = []
            for r in row_of:
                bounds, design = r["peaks"][peak]["bounds_s"], r["peaks"][peak]["design"]
                assert design == min(bounds, key=bounds.get), (peak, r)
                assert ("recompute" in bounds) == (r["d"] <= 128), r
                taken.append(design)
            first_stored = taken.index("stored")
            assert set(taken[first_stored:]) == {"stored"}, (peak, m, taken)
            switches[peak, m] = row_of[first_stored]["d"]
    assert all(switches["H100", m] > 128 for m in (16384, 65536)), switches
    assert all(switches["A100", m] <= 128 for m in (16384, 65536)), switches


@needs_kernel
@pytest.mark.interpret
def test_info_nce_backward_choice_is_the_smaller_count():
    # The choice function on host integers: both designs' launches counted at once, the smaller
    # sum of per-launch bounds taken; the stored G alone where the width admits nothing else.
    cost = _cost()
    bounds = cost.info_nce_bwd_bounds(300, 500, 40, torch.float16, True, "A100")
    assert set(bounds) == {"stored", "recompute"} and min(bounds.values()) > 0
    assert cost.info_nce_bwd_design(300, 500, 40, torch.float16, True, "A100") == min(
        bounds, key=bounds.get)
    assert set(cost.info_nce_bwd_bounds(300, 500, 70, torch.float16, True, "A100")) == {"stored"}
    # The op's choice made inside a recording of its caller (the cost model's: launches and
    # torch ops) leaves nothing there: the choice's own counting is kept aside.
    from spcl_fast.ops.info_nce import bwd_design

    cost.info_nce_bwd_bounds.cache_clear()
    with cost.counting() as outer:
        chosen = bwd_design(301, 301, 40, torch.float16, False, torch.device("meta"))
    assert chosen == cost.info_nce_bwd_design(301, 301, 48, torch.float16, False, "H100")
    assert list(outer) == []
