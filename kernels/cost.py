"""A cost model of the kernels, counted without a GPU: for every launch the launchers make (the
launches :func:`spcl_fast.kernels.aot.recording` records on ``meta`` tensors, with their grid,
constexprs and arguments) the bytes its programs load and store, the tensor-core FLOPs and
``exp2`` evaluations, its occupancy on sm_80 and sm_90, and the roofline bound at a stated peak::

    python -m spcl_fast.kernels.cost                         # the table on stdout
    python -m spcl_fast.kernels.cost --json benchmarks/results/cost-model.json \\
        --markdown docs/kernels.md                           # save both (tests/test_cost_model.py)

What is counted, per launch of one config (the first candidate the kernel's pruning keeps,
the one ``SPCL_FAST_AUTOTUNE=0`` runs, unless a column says otherwise):

* **bytes**: every element a ``tl.load`` or ``tl.store`` requests, masked-off lanes excluded,
  counted once per program that requests it (a K/V tile that four programs load counts four
  times): the traffic if no load hits in cache, hence an upper bound on DRAM bytes.
* **MMA FLOPs**: ``2 * M * N * K`` per ``tl.dot`` of ``(M, K) @ (K, N)`` tiles as compiled,
  padding rows, columns and head-dim lanes included (the tensor cores multiply them).
* **exp2**: elements of every ``tl.exp2`` (the special-function units' work; softmax-heavy
  kernels at small head dims can be bound by it).
* **torch ops**: what a launcher or the autograd layer runs between kernels (zero-filled
  outputs, the stack of three gradients): one launch each, inputs read and outputs written once.

Counting follows each kernel's tile loop from the launch's grid, block sizes and segment
lengths; ``tests/test_cost_model.py`` checks every counter against the same kernels run under
the Triton interpreter with each load, store, dot and exp2 tallied, at awkward shapes.
Occupancy (resident CTAs per SM) is CUDA's occupancy rule (``cuda_occupancy.h``: registers
allocated per warp in 256s per sub-partition, shared memory in 128-byte granules plus 1 KiB per
CTA) applied to the registers and shared memory the ``aot`` tier measured for that compile
(``benchmarks/results/aot-<triton>.json``, found by compile hash).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .. import flops as algorithmic
from . import aot
from . import partition_attention as pa
from .info_nce import _pad16, bwd_designs, info_nce_bwd, info_nce_fwd, machine_of

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MARKERS = ("<!-- cost-model:begin -->", "<!-- cost-model:end -->")


# ---------------------------------------------------------------------------------------------
# The machines


@dataclass(frozen=True)
class Peak:
    """A GPU's stated peaks: HBM bandwidth, dense tensor-core rate per operand class, SMs and
    the clock both rates assume (exp2: 16 results per clock per SM on sm_80 and sm_90, the CUDA
    C++ Programming Guide's throughput table)."""

    name: str
    target: str
    sms: int
    bytes_per_s: float
    mma_per_s: dict  # "16-bit" (bf16/fp16 operands), "tf32" (fp32 operands)
    clock_hz: float
    regs_per_sm: int = 65536
    warps_per_sm: int = 64
    ctas_per_sm: int = 32
    shared_per_sm: int = 0

    @property
    def exp2_per_s(self) -> float:
        return 16 * self.sms * self.clock_hz


PEAKS = {
    "H100": Peak("H100 SXM", "sm_90", 132, 3.35e12, {"16-bit": 989e12, "tf32": 494.5e12},
                 1.83e9, shared_per_sm=233472),
    "A100": Peak("A100 SXM 80GB", "sm_80", 108, 2.039e12, {"16-bit": 312e12, "tf32": 156e12},
                 1.41e9, shared_per_sm=167936),
}


def ctas_per_sm(peak: Peak, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident CTAs per SM of a kernel (``cudaOccMaxActiveBlocksPerMultiprocessor``'s rule)."""
    per_warp = -(-registers * 32 // 256) * 256
    warps = (peak.regs_per_sm // 4 // per_warp) * 4  # registers are split over 4 sub-partitions
    by_regs = warps // num_warps
    by_warps = peak.warps_per_sm // num_warps
    granule = -(-(shared_bytes + 1024) // 128) * 128  # + the driver's 1 KiB per CTA
    by_shared = peak.shared_per_sm // granule
    return min(by_regs, by_warps, by_shared, peak.ctas_per_sm)


# ---------------------------------------------------------------------------------------------
# Counts


@dataclass
class Count:
    """What the programs of one launch (or a sum of launches) do."""

    programs: int = 0
    read: int = 0  # bytes the loads request
    written: int = 0  # bytes the stores request
    mma_flops: int = 0
    exp2: int = 0
    read_unique: int = 0  # bytes at distinct addresses among the loads
    written_unique: int = 0  # ... among the stores

    def __add__(self, other: Count) -> Count:
        return Count(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __mul__(self, times: int) -> Count:
        return Count(*(getattr(self, f.name) * times for f in fields(self)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(length: int, block: int) -> Counter:
    """Valid rows of the ``block``-row tiles over ``length`` rows: {rows: how many tiles}."""
    full, tail = divmod(length, block)
    return Counter({block: full} if full else {}) + Counter({tail: 1} if tail else {})


def _bytes(t: torch.Tensor) -> int:
    return t.element_size()


def _footprint(count: Count, read: list[tuple], written: list[tuple]) -> Count:
    """``count`` with its unique bytes: ``read`` and ``written`` list ``(tensor, bytes of it
    touched)``; a tensor passed as two arguments (NT-Xent's queries that are its keys) counts
    once, with the larger of its footprints."""
    def union(pairs):
        most = {}
        for tensor, size in pairs:
            most[id(tensor)] = max(most.get(id(tensor), 0), size)
        return sum(most.values())

    count.read_unique, count.written_unique = union(read), union(written)
    return count


def _segments(a: dict, lengths: list[int]) -> tuple[int, int, int, int]:
    """(bytes of cu_seqlens the programs read, packed positions T, bytes of the token index over
    them, bytes of one (T, H, Dh) operand over the segments)."""
    q = a["Q"]
    total = sum(lengths)
    index = 8 * total if a["HAS_INDEX"] else 0
    return 4 * (len(lengths) + 1), total, index, total * q.shape[1] * a["HEAD_DIM"] * _bytes(q)


# Each counter: (named arguments and config of the launch, its grid, segment lengths) -> Count,
# under the kernel's name qualified by its module ("info_nce._grad_kernel").
COUNTERS: dict[str, Callable[[dict, tuple, list[int]], Count]] = {}


def kernel_name(kernel) -> str:
    """``module.function`` of a ``JITFunction`` (or the interpreter's stand-in)."""
    fn = kernel.fn
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def counter(name: str):
    def register(fn):
        COUNTERS[name] = fn
        return fn

    return register


# Partition attention (kernels/partition_attention.py). Every program of the (blocks, heads,
# segments) grid reads its segment's two cu_seqlens entries; those past the segment's end stop
# there. A "row" of q/k/v/o/dO is HEAD_DIM elements; with HAS_INDEX every row block's packed
# positions are first turned into rows by one int64 load per position.


def _attention_programs(a: dict, grid: tuple) -> Count:
    return Count(programs=math.prod(grid), read=8 * math.prod(grid))


@counter("partition_attention._fwd_kernel")
def _attention_fwd(a: dict, grid: tuple, lengths: list[int]) -> Count:
    e, d, idx = _bytes(a["Q"]), a["HEAD_DIM"], 8 * bool(a["HAS_INDEX"])
    bm, bn, bd = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_D"]
    total = _attention_programs(a, grid)
    for length, segments in Counter(lengths).items():
        steps = _cdiv(length, bn)
        for rows, tiles in _tiles(length, bm).items():  # query blocks stream over the keys
            total += Count(read=rows * (idx + d * e) + length * (idx + 2 * d * e),
                           written=rows * (d * e + 4), mma_flops=steps * 2 * (2 * bm * bn * bd),
                           exp2=steps * (bm * bn + bm)) * (tiles * segments * a["Q"].shape[1])
    cu, t, index, vec = _segments(a, lengths)
    stats = t * a["Q"].shape[1] * 4
    return _footprint(total, [(a["cu_seqlens"], cu), (a["token_index"], index), (a["Q"], vec),
                              (a["K"], vec), (a["V"], vec)], [(a["Out"], vec), (a["Lse"], stats)])


@counter("partition_attention._bwd_preprocess_kernel")
def _attention_delta(a: dict, grid: tuple, lengths: list[int]) -> Count:
    rows = a["total"]  # packed positions, all heads
    e, d, idx = _bytes(a["Out"]), a["HEAD_DIM"], 8 * bool(a["HAS_INDEX"])
    heads = a["Out"].shape[1]
    vec = rows * heads * d * e
    return _footprint(Count(programs=math.prod(grid), read=rows * heads * (idx + 2 * d * e),
                            written=rows * heads * 4),
                      [(a["token_index"], rows * idx), (a["Out"], vec), (a["DOut"], vec)],
                      [(a["Delta"], rows * heads * 4)])


def _dkdv_block(rows: int, length: int, a: dict, bm: int, bn: int, delta_from_out: bool) -> Count:
    """One key block of ``rows`` keys streaming over the ``length`` queries of its segment: K,
    V once; per query block its rows, Q, dO, lse and delta (or O, to compute delta); 4 dots;
    dK and dV stored."""
    e, d, idx, bd = _bytes(a["Q"]), a["HEAD_DIM"], 8 * bool(a["HAS_INDEX"]), a["BLOCK_D"]
    per_query = idx + 2 * d * e + 4 + (d * e if delta_from_out else 4)
    steps = _cdiv(length, bm)
    return Count(read=rows * (idx + 2 * d * e) + length * per_query, written=rows * 2 * d * e,
                 mma_flops=steps * 4 * (2 * bm * bn * bd), exp2=steps * bm * bn)


def _dq_block(rows: int, length: int, a: dict, bm: int, bn: int, delta_from_out: bool) -> Count:
    """One query block of ``rows`` queries streaming over its segment's keys: its rows, Q, dO,
    lse and delta (or O) once; per key block its rows, K and V; 3 dots; dQ stored."""
    e, d, idx, bd = _bytes(a["Q"]), a["HEAD_DIM"], 8 * bool(a["HAS_INDEX"]), a["BLOCK_D"]
    own = idx + 2 * d * e + 4 + (d * e if delta_from_out else 4)
    steps = _cdiv(length, bn)
    return Count(read=rows * own + length * (idx + 2 * d * e), written=rows * d * e,
                 mma_flops=steps * 3 * (2 * bm * bn * bd), exp2=steps * bm * bn)


def _backward_footprint(count: Count, a: dict, lengths: list[int], grads: list[str]) -> Count:
    """The backward kernels read Q, K, V, dO, lse and delta (the two-kernel ones) or O (the
    one-pass one) over the segments, and write their gradients."""
    cu, t, index, vec = _segments(a, lengths)
    stats = t * a["Q"].shape[1] * 4
    read = [(a["cu_seqlens"], cu), (a["token_index"], index), (a["Lse"], stats),
            *((a[name], vec) for name in ("Q", "K", "V", "DOut"))]
    read.append((a["Out"], vec) if "Out" in a else (a["Delta"], stats))
    return _footprint(count, read, [(a[name], vec) for name in grads])


def _two_kernel_counter(block_of: Callable, outer: str, grads: list[str]) -> Callable:
    """The counter of a kernel whose programs each take one ``outer``-sized block of their
    segment (:func:`_dkdv_block` over key blocks, :func:`_dq_block` over query blocks)."""
    def count(a: dict, grid: tuple, lengths: list[int]) -> Count:
        total = _attention_programs(a, grid)
        for length, segments in Counter(lengths).items():
            for rows, tiles in _tiles(length, a[outer]).items():
                total += block_of(rows, length, a, a["BLOCK_M"], a["BLOCK_N"], False) * (
                    tiles * segments * a["Q"].shape[1])
        return _backward_footprint(total, a, lengths, grads)

    return count


COUNTERS["partition_attention._bwd_dkdv_kernel"] = _two_kernel_counter(_dkdv_block, "BLOCK_N",
                                                                       ["DK", "DV"])
COUNTERS["partition_attention._bwd_dq_kernel"] = _two_kernel_counter(_dq_block, "BLOCK_M", ["DQ"])


@counter("partition_attention._bwd_onepass_kernel")
def _attention_onepass(a: dict, grid: tuple, lengths: list[int]) -> Count:
    """One program per (segment, head): its segment's bounds, then a segment of <= TILE tokens
    in one tile (its rows, Q, K, V, O, dO and lse read once; 5 dots; dQ, dK, dV stored), a
    longer one (an understated max_seqlen) by key and query blocks of LONG_BLOCK with delta
    from O, an empty one nothing more."""
    e, d, idx, bd = _bytes(a["Q"]), a["HEAD_DIM"], 8 * bool(a["HAS_INDEX"]), a["BLOCK_D"]
    tile, block = a["TILE"], a["LONG_BLOCK"]
    total = Count(programs=math.prod(grid), read=8 * math.prod(grid))
    for length, segments in Counter(lengths).items():
        if length > tile:
            item = sum((_dkdv_block(r, length, a, block, block, True) * n
                        + _dq_block(r, length, a, block, block, True) * n
                        for r, n in _tiles(length, block).items()), Count())
        elif length:
            item = Count(read=length * (idx + 5 * d * e + 4), written=length * 3 * d * e,
                         mma_flops=5 * 2 * tile * tile * bd, exp2=tile * tile)
        else:
            item = Count()
        total += item * (segments * a["heads"])
    return _backward_footprint(total, a, lengths, ["DQ", "DK", "DV"])


# InfoNCE (kernels/info_nce.py): rows padded to D (a multiple of 16) by the launcher; every row
# vector (inverse norms, log-sum-exps, their gradients, column partials) is fp32; group ids
# are loaded only with HAS_GROUPS.


@counter("info_nce._inv_norm_kernel")
def _inv_norm(a: dict, grid: tuple, lengths: list[int]) -> Count:
    m, d = a["M"], a["D"]
    return _footprint(Count(programs=math.prod(grid), read=m * d * _bytes(a["Z"]), written=m * 4),
                      [(a["Z"], m * d * _bytes(a["Z"]))], [(a["INV"], m * 4)])


def _logits(rows: int, cols: int, a: dict, bm: int, bn: int, own_loaded: bool) -> Count:
    """One logits tile: ``rows`` queries against ``cols`` keys over the padded width, the key
    tile loaded once (resident rows: one dot; streamed: a dot per BLOCK_D chunk, the query
    chunk reloaded with each unless ``own_loaded``)."""
    d, e, bd = a["D"], _bytes(a["Q"]), a["BLOCK_D"]
    if a["RESIDENT"]:
        return Count(read=cols * d * e, mma_flops=2 * bm * bn * bd)
    return Count(read=(cols + rows * (not own_loaded)) * d * e,
                 mma_flops=_cdiv(d, bd) * 2 * bm * bn * bd)


def _groups(a: dict, name: str) -> int:
    return _bytes(a[name]) if a["HAS_GROUPS"] else 0


@counter("info_nce._fwd_kernel")
def _info_nce_fwd(a: dict, grid: tuple, lengths: list[int]) -> Count:
    """Per query block: its rows (resident) or chunks per key block (streamed); per key block
    the key tile, its inverse norms (and group ids), one exp2 per logit (two with WRITE_COL,
    which also stores the block's column max and sum)."""
    mq, mk, d, e = a["Mq"], a["Mk"], a["D"], _bytes(a["Q"])
    bm, bn = a["BLOCK_M"], a["BLOCK_N"]
    g_q, g_k, col = _groups(a, "GQ"), _groups(a, "GK"), bool(a["WRITE_COL"])
    total = Count(programs=math.prod(grid))
    for rows, row_tiles in _tiles(mq, bm).items():
        own = rows * (4 + g_q + (d * e if a["RESIDENT"] else 0))
        total += Count(read=own, written=rows * 8, exp2=_cdiv(mk, bn) * bm) * row_tiles
        for cols, col_tiles in _tiles(mk, bn).items():
            total += (_logits(rows, cols, a, bm, bn, False) + Count(
                read=cols * (4 + g_k), written=cols * 8 * col,
                exp2=bm * bn * (1 + col))) * (row_tiles * col_tiles)
    partials = _cdiv(mq, bm) * mk * 4 * col
    return _footprint(total, [(a["INV_Q"], mq * 4), (a["GQ"], mq * g_q), (a["Q"], mq * d * e),
                              (a["INV_K"], mk * 4), (a["GK"], mk * g_k), (a["K"], mk * d * e)],
                      [(a["LSE"], mq * 4), (a["POS"], mq * 4), (a["COL_M"], partials),
                       (a["COL_S"], partials)])


@counter("info_nce._col_lse_kernel")
def _col_lse(a: dict, grid: tuple, lengths: list[int]) -> Count:
    """Per column: the max and sum of every row block, merged (2 exp2 each), one lse stored."""
    cols, blocks, width = a["Mk"], a["n_blocks"], a["BLOCK"]
    return _footprint(Count(programs=math.prod(grid), read=cols * blocks * 8, written=cols * 4,
                            exp2=math.prod(grid) * blocks * 2 * width),
                      [(a["COL_M"], cols * blocks * 4), (a["COL_S"], cols * blocks * 4)],
                      [(a["LSE"], cols * 4)])


@counter("info_nce._bwd_rows_kernel")
def _info_nce_rows(a: dict, grid: tuple, lengths: list[int]) -> Count:
    """Per query block of the chunk: its statistics, its rows (resident); per key block the
    logits tile, G (one exp2 per logit and direction), with STORE_G stored in the input dtype
    into the chunk buffer, and with resident rows ``G @ n_k`` (one more dot) and dzq written at
    the end."""
    mk, d, e = a["Mk"], a["D"], _bytes(a["Q"])
    bm, bn, bd = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_D"]
    g_q, g_k, has_col = _groups(a, "GQ"), _groups(a, "GK"), bool(a["HAS_COL"])
    resident, g_bytes = bool(a["RESIDENT"]), _bytes(a["GBUF"]) * bool(a["STORE_G"])
    total = Count(programs=math.prod(grid), read=4 * math.prod(grid))  # GSCALE
    for rows, row_tiles in _tiles(a["row_end"] - a["row0"], bm).items():
        own = rows * (16 + g_q + (2 * d * e if resident else 0))  # q, and z again at the end
        total += Count(read=own, written=rows * d * _bytes(a["DZ"]) * resident) * row_tiles
        for cols, col_tiles in _tiles(mk, bn).items():
            total += (_logits(rows, cols, a, bm, bn, False) + Count(
                read=cols * (4 + g_k + 8 * has_col), written=rows * cols * g_bytes,
                mma_flops=2 * bm * bn * bd * resident,
                exp2=bm * bn * (1 + has_col))) * (row_tiles * col_tiles)
    rows = a["row_end"] - a["row0"]
    return _footprint(total, [*_query_reads(a, rows), *_key_reads(a, mk)],
                      [(a["GBUF"], rows * mk * g_bytes),
                       (a["DZ"], rows * d * _bytes(a["DZ"]) * resident)])


def _query_reads(a: dict, rows: int) -> list[tuple]:
    """What the backward kernels read of ``rows`` queries: features, group ids, inverse norms,
    log-sum-exps and the weights of the row and positive statistics (and the scalar GSCALE)."""
    e = _bytes(a["Q"])
    return [(a["GSCALE"], 4), (a["Q"], rows * a["D"] * e), (a["GQ"], rows * _groups(a, "GQ")),
            *((a[name], rows * 4) for name in ("INV_Q", "LSE_R", "D_ROW", "D_POS"))]


def _key_reads(a: dict, cols: int) -> list[tuple]:
    """... and of ``cols`` keys: features, group ids, inverse norms, the column statistics."""
    has_col = bool(a["HAS_COL"])
    return [(a["INV_K"], cols * 4), (a["K"], cols * a["D"] * _bytes(a["K"])),
            (a["GK"], cols * _groups(a, "GK")),
            *((a[name], cols * 4 * has_col) for name in ("LSE_C", "D_COL"))]


@counter("info_nce._bwd_cols_kernel")
def _info_nce_cols(a: dict, grid: tuple, lengths: list[int]) -> Count:
    """Per key block: its statistics and rows (the rows again at the end), dzk stored; per
    query block of the stream its statistics and rows, and the key block's group ids again
    (the candidates' rule loads them per tile); per tile the logits and ``G^T @ n_q`` dots and
    G's exp2 (one per logit and direction)."""
    mq, mk, d, e = a["Mq"], a["Mk"], a["D"], _bytes(a["Q"])
    bm, bn, bd = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_D"]
    g_q, g_k, has_col = _groups(a, "GQ"), _groups(a, "GK"), bool(a["HAS_COL"])
    dz = _bytes(a["DZ"])
    total = Count(programs=math.prod(grid), read=4 * math.prod(grid))  # GSCALE
    for cols, col_tiles in _tiles(mk, bn).items():
        total += Count(read=cols * (4 + 8 * has_col + 2 * d * e),
                       written=cols * d * dz) * col_tiles
        for rows, row_tiles in _tiles(mq, bm).items():
            total += Count(read=rows * (16 + g_q + d * e) + cols * g_k,
                           mma_flops=2 * (2 * bm * bn * bd),
                           exp2=bm * bn * (1 + has_col)) * (col_tiles * row_tiles)
    return _footprint(total, [*_query_reads(a, mq), *_key_reads(a, mk)], [(a["DZ"], mk * d * dz)])


@counter("info_nce._gemm_kernel")
def _info_nce_gemm(a: dict, grid: tuple, lengths: list[int]) -> Count:
    """Per output block and feature chunk: the stored G, the reduced rows' inverse norms and
    features; one dot per reduction block; the fp32 accumulator stored (read first when
    ACCUMULATE)."""
    d, e, g_bytes = a["D"], _bytes(a["Z"]), _bytes(a["GBUF"])
    bo, br, bdo = a["BLOCK_O"], a["BLOCK_R"], a["BLOCK_DO"]
    total = Count(programs=math.prod(grid))
    for part, parts in _tiles(d, bdo).items():
        for out, out_tiles in _tiles(a["M_out"], bo).items():
            total += Count(read=out * part * 4 * bool(a["ACCUMULATE"]),
                           written=out * part * 4) * (parts * out_tiles)
            for red, red_tiles in _tiles(a["M_red"], br).items():
                total += Count(read=red * (out * g_bytes + 4 + part * e),
                               mma_flops=2 * bo * br * bdo) * (parts * out_tiles * red_tiles)
    m_out, m_red, acc = a["M_out"], a["M_red"], a["M_out"] * d * 4
    return _footprint(total, [(a["GBUF"], m_out * m_red * g_bytes), (a["INV"], m_red * 4),
                              (a["Z"], m_red * d * e), (a["ACC"], acc * bool(a["ACCUMULATE"]))],
                      [(a["ACC"], acc)])


@counter("info_nce._normalize_bwd_kernel")
def _info_nce_normalize(a: dict, grid: tuple, lengths: list[int]) -> Count:
    """Two passes over each row: the fp32 accumulator and the features, then dz stored."""
    m, d, e = a["M"], a["D"], _bytes(a["Z"])
    count = Count(programs=math.prod(grid), read=4 * math.prod(grid) + m * (4 + 2 * d * (4 + e)),
                  written=m * d * _bytes(a["DZ"]))
    return _footprint(count, [(a["GSCALE"], 4), (a["INV"], m * 4), (a["ACC"], m * d * 4),
                              (a["Z"], m * d * e)], [(a["DZ"], m * d * _bytes(a["DZ"]))])


# ---------------------------------------------------------------------------------------------
# Launches and torch ops, counted


@dataclass
class Step:
    """One launch of an op: a Triton kernel (with its config and occupancy) or a torch op."""

    name: str
    count: Count
    dtype: str  # operand class of its dots: "16-bit", "tf32" or "-" (none)
    config: dict = field(default_factory=dict)
    occupancy: dict = field(default_factory=dict)  # peak name -> CTAs per SM (None: unknown)
    best: dict = field(default_factory=dict)  # peak name -> bound (s) of its best candidate

    def bound(self, peak: Peak) -> dict:
        """Seconds at the peak's bandwidth (for the launch's unique bytes: each launch starts
        from a cold cache), MMA rate and exp2 rate; the bound is the largest."""
        rate = peak.mma_per_s.get(self.dtype)
        unique = self.count.read_unique + self.count.written_unique
        return {"memory": unique / peak.bytes_per_s,
                "mma": self.count.mma_flops / rate if rate else 0.0,
                "exp2": self.count.exp2 / peak.exp2_per_s}


def _operand_class(t: torch.Tensor) -> str:
    return "tf32" if t.dtype == torch.float32 else "16-bit"


class _TorchOps(TorchDispatchMode):
    """Records the torch ops run between kernels (no views, no uninitialised allocations)."""

    def __init__(self, steps: list):
        super().__init__()
        self.steps = steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name.startswith("empty"):
            return out

        def tensors(x):
            if isinstance(x, torch.Tensor):
                return [x]
            if isinstance(x, (list, tuple)):
                return [t for item in x for t in tensors(item)]
            return []

        outputs = tensors(out)
        destinations = {id(t) for t in outputs}  # an in-place op's self is written, not read
        read = sum(t.numel() * t.element_size() for a in [*args, *(kwargs or {}).values()]
                   for t in tensors(a) if id(t) not in destinations)
        written = sum(t.numel() * t.element_size() for t in outputs)
        self.steps.append(Step(f"torch {name}", Count(read=read, written=written,
                                                      read_unique=read, written_unique=written),
                               "-"))
        return out


@contextlib.contextmanager
def counting() -> Iterator[list]:
    """Inside the block, kernel launches are recorded instead of run (``aot.recording``) and
    torch ops are recorded as they run; yields the list, in order, of ``aot.Launch`` and
    :class:`Step` (torch op) entries."""
    with aot.recording() as recorded, _TorchOps(recorded):
        yield recorded


def named(launch: aot.Launch, config: int = 0) -> tuple[dict, tuple]:
    """A launch's arguments by name (config keywords included) and its grid, as Triton would
    resolve them for the ``config``-th candidate."""
    fn, keyword_sets = aot.candidates(launch.kernel, launch.args, launch.kwargs)
    meta = keyword_sets[config]
    args = {**dict(zip(fn.arg_names, launch.args, strict=False)), **meta}
    grid = launch.grid(args) if callable(launch.grid) else launch.grid
    return args, tuple(grid) + (1,) * (3 - len(grid))


def count_launch(launch: aot.Launch, lengths: list[int], config: int = 0) -> tuple[str, Count]:
    """(kernel name, counts) of one config of a recorded launch."""
    name = kernel_name(aot.candidates(launch.kernel, launch.args, launch.kwargs)[0])
    if name not in COUNTERS:
        raise KeyError(f"no cost counter for kernel {name}: add one to {__name__}")
    args, grid = named(launch, config)
    return name, COUNTERS[name](args, grid, lengths)


def _saved_compiles() -> dict:
    path = RESULTS / f"aot-{triton.__version__}.json"
    if not path.exists():
        return {}
    return {r["compile_hash"]: r for r in json.loads(path.read_text())["rows"]}


def steps(recorded: list, lengths: list[int], compiles: dict) -> list[Step]:
    """Every recorded launch counted (first candidate config), with its occupancy per peak
    from the saved compiles and the bound of its best candidate."""
    out = []
    for launch in recorded:
        if isinstance(launch, Step):
            out.append(launch)
            continue
        fn, keyword_sets = aot.candidates(launch.kernel, launch.args, launch.kwargs)
        name, count = count_launch(launch, lengths)
        first = keyword_sets[0]
        dtype = _operand_class(next(a for a in launch.args if isinstance(a, torch.Tensor)))
        config = {k: v for k, v in first.items() if k.startswith("BLOCK")}
        config |= {k: first[k] for k in (*aot._META, "maxnreg") if k in first}
        step = Step(name, count, dtype if count.mma_flops else "-", config)
        for key, peak in PEAKS.items():
            row = compiles.get(aot.compile_hash(*aot.source(launch, 0, peak.target)[2:]))
            step.occupancy[key] = row and ctas_per_sm(peak, row["registers"],
                                                      row["shared_bytes"],
                                                      row["config"]["num_warps"])
            bounds = []
            for i in range(len(keyword_sets)):
                candidate = Step(name, count_launch(launch, lengths, i)[1], step.dtype)
                bounds.append(max(candidate.bound(peak).values()))
            step.best[key] = min(bounds)
        out.append(step)
    return out


# ---------------------------------------------------------------------------------------------
# InfoNCE's backward: the design the op passes the launcher (choose_bwd_design below)


@functools.lru_cache(maxsize=256)
def info_nce_bwd_bounds(mq: int, mk: int, d: int, dtype: torch.dtype, symmetric: bool,
                        peak: str = "H100") -> dict[str, float]:
    """Seconds each backward design the launcher can take for ``mq`` queries against ``mk``
    keys of width ``d`` is bound to at ``PEAKS[peak]``: its launches counted (first candidate
    config) and bound one by one (the largest of the memory, MMA and exp2 terms), summed. The
    torch ops around the kernels (the weights' scale, padded copies) are the same in both
    designs and left out. Host integers only: the launches are recorded on ``meta`` tensors,
    aside from any recording or dispatch mode of the caller, and nothing runs."""
    zq, zk = (torch.empty(m, d, dtype=dtype, device="meta") for m in (mq, mk))
    vq, vk = (torch.empty(m, dtype=torch.float32, device="meta") for m in (mq, mk))
    col = vk if symmetric else vk[:0]
    bounds = {}
    with _disable_current_modes():
        for design in bwd_designs(d, dtype):
            with aot.recording() as recorded:
                info_nce_bwd(zq, zk, vq, vk, vq, col, vq, col, vq, 10.0, design=design)
            bounds[design] = sum(
                max(Step(*count_launch(x, []), _operand_class(zq)).bound(PEAKS[peak]).values())
                for x in recorded)
    return bounds


def info_nce_bwd_design(mq: int, mk: int, d: int, dtype: torch.dtype, symmetric: bool,
                        peak: str = "H100") -> str:
    """The backward design with the smaller bound (:func:`info_nce_bwd_bounds`; the stored
    ``G`` on a tie, and wherever the width admits no other)."""
    bounds = info_nce_bwd_bounds(mq, mk, d, dtype, symmetric, peak)
    return min(bounds, key=bounds.get)


def choose_bwd_design(mq: int, mk: int, d: int, dtype: torch.dtype, symmetric: bool,
                      device: torch.device) -> str:
    """The backward design the op takes for a call: the one :func:`info_nce_bwd_design` bounds
    faster on the device's machine (:func:`~spcl_fast.kernels.info_nce.machine_of`) at the
    launcher's padded width. Recompute pays two more logits matmuls and the exponentials again
    to save ``G``'s ``Mq x Mk`` write and read: it wins where that traffic takes longer than the
    extra tensor-core and special-function work, that is at small widths on machines with more
    FLOPs per byte. Host-side integers only (cached per problem)."""
    width = _pad16(d)
    if len(bwd_designs(width, dtype)) == 1:
        return bwd_designs(width, dtype)[0]
    return info_nce_bwd_design(mq, mk, width, dtype, symmetric, machine_of(device))


# ---------------------------------------------------------------------------------------------
# The problems of the table: ViT-B/16 at 224 px (196 patches), batch 256, bf16


IMAGES, PATCHES, HEADS, HEAD_DIM = 256, 196, 12, 64
ATTENTION_TOKENS = (49, 98, 196)  # keep 0.5 (two 25% subsets), a 50/50 split, whole images
INFO_NCE_ROWS, INFO_NCE_DIMS = (16384, 65536), (128, 512, 1000, 1024)


OLD_BACKWARD = "two kernels, 3 gradients stacked"  # before issue 35: q/k/v views, 3 buffers
NEW_BACKWARD = "qkv buffer"  # one (R, 3, H, Dh) gradient; one pass where the segments fit


@contextlib.contextmanager
def _two_kernel_backward():
    """The dK/dV + dQ backward whatever the segment length (the one-pass kernel switched off)."""
    onepass_tile = pa.onepass_tile
    pa.onepass_tile = lambda *args: 0
    try:
        yield
    finally:
        pa.onepass_tile = onepass_tile


@dataclass(frozen=True)
class Problem:
    op: str  # "attention forward", "attention backward", "info_nce forward", "info_nce backward"
    design: str  # attention backward: OLD_BACKWARD or NEW_BACKWARD (the launcher's dispatch);
    #              InfoNCE backward: one of bwd_designs ("stored" G or "recompute")
    layout: str  # attention: "packed" or "in-place"; InfoNCE: "cross" (CLIP's symmetric loss)
    size: int  # attention: tokens per segment; InfoNCE: rows M per side
    dim: int  # head dim or InfoNCE's d
    dtype: str = "bf16"

    def lengths(self) -> list[int]:
        """Segment lengths: two subsets per image below the image's token count, else one."""
        if not self.op.startswith("attention"):
            return []
        return [self.size] * (IMAGES * (2 if self.size < PATCHES else 1))

    def algorithmic_flops(self) -> int:
        """The algorithm's FLOPs (``spcl_fast.flops``): attention ``4 sum(L^2) H Dh`` forward,
        2.5x that backward; InfoNCE ``2 M^2 d`` forward (one logits matmul for both directions)
        and ``4 M^2 d`` backward."""
        if self.op == "attention forward":
            return algorithmic.attention_flops(self.lengths(), HEADS, self.dim)
        if self.op == "attention backward":
            return algorithmic.attention_bwd_flops(self.lengths(), HEADS, self.dim)
        logits = algorithmic.info_nce_flops(self.size, self.size, self.dim)
        return logits if self.op == "info_nce forward" else 2 * logits

    def record(self) -> list:
        """The launches and torch ops of the problem, in order (on meta tensors)."""
        dtype = aot.DTYPES[self.dtype]
        if self.op.startswith("attention"):
            return self._attention(dtype)
        return self._info_nce(dtype)

    def _attention(self, dtype) -> list:
        lengths = self.lengths()
        total = sum(lengths)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="meta")
        index = None
        rows = total
        if self.layout == "in-place":  # rows of the (B*N) tokens, those kept in a segment
            index = torch.empty(total, dtype=torch.int64, device="meta")
            rows = IMAGES * PATCHES
        qkv = torch.empty(rows, 3, HEADS, self.dim, dtype=dtype, device="meta")
        q, k, v = qkv.unbind(1)
        args = (cu, self.size, index, self.dim**-0.5)
        with aot.recording():
            out, lse = pa.partition_attention_fwd(q, k, v, *args)
        dout = torch.empty_like(out)
        with counting() as recorded:
            if self.op == "attention forward":
                pa.partition_attention_fwd(q, k, v, *args)
            elif self.design == OLD_BACKWARD:
                with _two_kernel_backward():
                    grads = pa.partition_attention_bwd(dout, q, k, v, out, lse, *args)
                torch.stack(grads, 1)  # autograd's backward of qkv.unbind(1)
            else:
                pa.partition_attention_qkvpacked_bwd(dout, qkv, out, lse, *args)
        return recorded

    def _info_nce(self, dtype) -> list:
        za, zb = (torch.empty(self.size, self.dim, dtype=dtype, device="meta") for _ in "ab")
        vec = torch.empty(self.size, dtype=torch.float32, device="meta")
        with counting() as recorded:
            if self.op == "info_nce forward":
                info_nce_fwd(za, zb, 10.0, col_lse=True)
            else:
                info_nce_bwd(za, zb, vec, vec, vec, vec, vec, vec, vec, 10.0, design=self.design)
        return recorded

    def chosen(self) -> bool | None:
        """InfoNCE backward where the width admits two designs: whether the launcher takes this
        one on an H100 (None elsewhere)."""
        if self.op != "info_nce backward" or len(bwd_designs(self.dim, aot.DTYPES[self.dtype])) < 2:
            return None
        return self.design == info_nce_bwd_design(self.size, self.size, self.dim,
                                                  aot.DTYPES[self.dtype], True, "H100")


def problems() -> list[Problem]:
    """The table's rows: attention at ViT-B/16 224 px shapes, InfoNCE at CLIP-like batches."""
    out = []
    for tokens in ATTENTION_TOKENS:
        for layout in ("packed", "in-place"):
            out.append(Problem("attention forward", "q, k, v views", layout, tokens, HEAD_DIM))
            for design in (OLD_BACKWARD, NEW_BACKWARD):
                out.append(Problem("attention backward", design, layout, tokens, HEAD_DIM))
    for rows in INFO_NCE_ROWS:
        for d in INFO_NCE_DIMS:
            out.append(Problem("info_nce forward", "one pass", "cross", rows, d))
            for design in bwd_designs(d, aot.DTYPES["bf16"]):
                out.append(Problem("info_nce backward", design, "cross", rows, d))
    return out


# The widths of the choice table: the resident ones of 16-bit rows and one beyond them.
CHOICE_DIMS = (32, 64, 96, 128, 256)


def choices() -> list[dict]:
    """InfoNCE backward, CLIP's symmetric loss in bf16 at the table's ``M``: each design's bound
    on each machine (:func:`info_nce_bwd_bounds`) and the one the launcher takes."""
    rows = []
    for m in INFO_NCE_ROWS:
        for d in CHOICE_DIMS:
            peaks = {}
            for key in PEAKS:
                bounds = info_nce_bwd_bounds(m, m, d, torch.bfloat16, True, key)
                peaks[key] = {"bounds_s": bounds,
                              "design": info_nce_bwd_design(m, m, d, torch.bfloat16, True, key)}
            rows.append({"M": m, "d": d, "dtype": "bf16", "symmetric": True, "peaks": peaks})
    return rows


def evaluate(problem: Problem, compiles: dict) -> dict:
    """One row: the problem, its launches counted, totals and bounds per peak."""
    launches = steps(problem.record(), problem.lengths(), compiles)
    total = sum((s.count for s in launches), Count())
    bounds = {}
    for key, peak in PEAKS.items():
        terms = [s.bound(peak) for s in launches]
        bounds[key] = {
            "bound_s": sum(max(t.values()) for t in terms),
            "best_config_bound_s": sum(s.best.get(key, max(t.values()))
                                       for s, t in zip(launches, terms, strict=True)),
            "limiter": max(("memory", "mma", "exp2"), key=lambda k: sum(t[k] for t in terms)),
            "min_ctas_per_sm": min((s.occupancy[key] for s in launches
                                    if s.occupancy.get(key) is not None), default=None),
        }
    return {**asdict(problem), "chosen": problem.chosen(),
            "algorithmic_flops": problem.algorithmic_flops(), "total": asdict(total), "launches": [
                {"name": s.name, "config": s.config, "occupancy": s.occupancy,
                 **asdict(s.count)} for s in launches],
            "bounds": bounds}


def _short(name: str) -> str:
    """``partition_attention._bwd_dkdv_kernel`` -> ``dkdv``; ``torch stack`` -> ``stack``."""
    name = name.rsplit(".", 1)[-1].removeprefix("torch ").strip("_")
    return name.removeprefix("bwd_").removesuffix("_kernel")


def _launches(launches: list[dict]) -> str:
    """``rows x8, gemm x8, normalize_bwd + 11 torch``: kernels in order of first launch."""
    kernels = Counter(_short(x["name"]) for x in launches if not x["name"].startswith("torch "))
    torch_ops = len(launches) - sum(kernels.values())
    text = ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in kernels.items())
    return text + (f" + {torch_ops} torch" if torch_ops else "")


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (:func:`evaluate`'s), bound at the H100's peaks."""
    h100 = PEAKS["H100"]
    lines = [f"Bound at the {h100.name}'s stated peaks: {h100.bytes_per_s / 1e12:g} TB/s, "
             f"{h100.mma_per_s['16-bit'] / 1e12:g} TFLOP/s with 16-bit operands, "
             f"{h100.exp2_per_s / 1e12:.2f}e12 exp2/s ({h100.sms} SMs at "
             f"{h100.clock_hz / 1e9:g} GHz).", "",
             "| op | design | layout | segment / M | d | launches | MB requested (unique) | "
             "MMA GFLOP (x algorithmic) | exp2 M | CTAs/SM sm_90 | H100 bound µs (best config) "
             "| limiter |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, b = r["total"], r["bounds"]["H100"]
        size = f"{r['size']} tokens" if r["op"].startswith("attention") else f"M = {r['size']}"
        ratio = t["mma_flops"] / r["algorithmic_flops"]
        ctas = b["min_ctas_per_sm"]
        design = r["design"] + (" (H100's choice)" if r["chosen"] else "")
        lines.append(
            f"| {r['op']} | {design} | {r['layout']} | {size} | {r['dim']} | "
            f"{len(r['launches'])}: {_launches(r['launches'])} | "
            f"{(t['read'] + t['written']) / 1e6:.0f} "
            f"({(t['read_unique'] + t['written_unique']) / 1e6:.0f}) | "
            f"{t['mma_flops'] / 1e9:.0f} (x{ratio:.2f}) | {t['exp2'] / 1e6:.0f} | "
            f"{'?' if ctas is None else ctas} | {b['bound_s'] * 1e6:.0f} "
            f"({b['best_config_bound_s'] * 1e6:.0f}) | {b['limiter']} |")
    return "\n".join(lines)


def choice_table(rows: list[dict]) -> str:
    """The markdown table of :func:`choices`' rows: each design's bound per machine, µs."""
    lines = ["InfoNCE backward, CLIP's symmetric loss in bf16: the bound of each design's kernels "
             "(µs; the torch ops around them are the same in both) and the design the launcher "
             "takes on each machine (`kernels/cost.py`'s `choose_bwd_design`); rows wider than "
             "the resident ones have only the stored G.", "",
             "| M | d | " + " | ".join(f"{k} stored G | {k} recompute | {k} takes" for k in PEAKS)
             + " |", "|---|---|" + "---|---|---|" * len(PEAKS)]
    for r in rows:
        cells = []
        for key in PEAKS:
            bounds = r["peaks"][key]["bounds_s"]
            cells += [f"{bounds['stored'] * 1e6:.0f}",
                      f"{bounds['recompute'] * 1e6:.0f}" if "recompute" in bounds else "-",
                      r["peaks"][key]["design"]]
        lines.append(f"| {r['M']} | {r['d']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def document(rows: list[dict], choice_rows: list[dict]) -> dict:
    return {"triton": triton.__version__, "torch": torch.__version__,
            "peaks": {k: {**asdict(p), "exp2_per_s": p.exp2_per_s} for k, p in PEAKS.items()},
            "rows": rows, "info_nce_bwd_choices": choice_rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spcl_fast.kernels.cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every row, launch by launch, to this file")
    parser.add_argument("--markdown", help="write the table into this file between the "
                        f"{MARKERS[0]} and {MARKERS[1]} lines")
    args = parser.parse_args(argv)
    if aot._common.INTERPRET:
        parser.error("unset TRITON_INTERPRET: the interpreter's configs are not the GPU's")
    compiles = _saved_compiles()
    rows = [evaluate(p, compiles) for p in problems()]
    choice_rows = choices()
    text = table(rows) + "\n\n" + choice_table(choice_rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(document(rows, choice_rows), indent=1) + "\n")
    if args.markdown:
        try:
            aot.write_between_markers(args.markdown, MARKERS, text)
        except (OSError, ValueError) as e:
            parser.exit(1, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
