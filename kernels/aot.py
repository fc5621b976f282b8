"""Every kernel config the launchers can choose, compiled ahead of time for GPU targets.

No GPU is needed: the launchers run on ``meta`` tensors with :func:`_common.launch` recording
instead of launching, so what is compiled is exactly what the launchers would launch (same
kernels, constexprs and Triton specialisation of the arguments), once per autotuning candidate
that survives the kernel's pruning. Each compile goes through ``triton.compile`` for an sm_80 and
an sm_90 target and reports registers and spills (from ``ptxas -v``), shared memory and
tensor-core instruction counts (``mma`` on sm_80, ``wgmma`` on sm_90) from the PTX::

    python -m spcl_fast.kernels.aot                      # the full matrix, a table
    python -m spcl_fast.kernels.aot --json benchmarks/results/aot-$(python -c \\
        "import triton; print(triton.__version__)").json
    python -m spcl_fast.kernels.aot --quick --jobs 2     # the CI subset (tests/test_aot.py)

It must run without ``TRITON_INTERPRET`` (the kernels are then plain ``JITFunction``s); tests run
it in a subprocess for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from . import _common
from .info_nce import info_nce_bwd, info_nce_fwd
from .partition_attention import partition_attention_bwd, partition_attention_fwd

# Per-block shared memory (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
TARGETS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Attention at ViT shapes: 12 heads, segments of ~100 tokens (S-PCL's halves of 196 patches).
HEADS, SEGMENTS, TOKENS = 12, 8, 100
ATTENTION_HEAD_DIMS = (32, 64, 72, 128)
LAYOUTS = ("packed", "in_place")
# InfoNCE: a batch of 256 pairs at projector widths 128 and 1000 (split output features).
PAIRS, INFO_NCE_DIMS = 256, (128, 1000)


class Launch(NamedTuple):
    """One launch as a launcher makes it: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any  # a JITFunction, or the Autotuner around one
    grid: Any  # a tuple, or a callable of the launch's named arguments and config
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block the launchers record their launches (in order, into the list this
    yields) instead of running them; on ``meta`` tensors nothing is computed at all."""
    recorded: list[Launch] = []
    _common._recorder = lambda *launch: recorded.append(Launch(*launch))
    try:
        yield recorded
    finally:
        _common._recorder = None


@dataclass(frozen=True)
class Case:
    """One call of one op's launchers: the kernels it launches are compiled for each target."""

    op: str  # "partition_attention" or "info_nce"
    dtype: str
    size: int  # head dim for attention, feature size d for InfoNCE
    variant: str  # attention: layout; InfoNCE: "cross" (symmetric CLIP) or "all" (NT-Xent)

    def launches(self) -> list[Launch]:
        """The launches the launchers would make for this case, in order."""
        with recording() as recorded:
            if self.op == "partition_attention":
                self._attention()
            else:
                self._info_nce()
        return recorded

    def _attention(self):
        dtype, head_dim = DTYPES[self.dtype], self.size
        total = SEGMENTS * TOKENS
        cu = torch.arange(0, total + 1, TOKENS, dtype=torch.int32, device="meta")
        index = None
        if self.variant == "in_place":  # rows of a (B*N) tensor, half of them in no segment
            index = torch.empty(total, dtype=torch.int64, device="meta")
        rows = total if index is None else 2 * total
        # q, k, v: the three views of one (R, 3, H, Dh) qkv tensor, as a ViT block makes them.
        q, k, v = torch.empty(rows, 3, HEADS, head_dim, dtype=dtype, device="meta").unbind(1)
        scale = head_dim**-0.5
        out, lse = partition_attention_fwd(q, k, v, cu, TOKENS, index, scale)
        partition_attention_bwd(torch.empty_like(out), q, k, v, out, lse, cu, TOKENS, index, scale)

    def _info_nce(self):
        dtype, d = DTYPES[self.dtype], self.size
        za, zb = (torch.empty(PAIRS, d, dtype=dtype, device="meta") for _ in range(2))
        vec = torch.empty(PAIRS, dtype=torch.float32, device="meta")
        if self.variant == "cross":  # CLIP's symmetric loss: row and column statistics
            row, _, col, inv_a, inv_b = info_nce_fwd(za, zb, 10.0, col_lse=True)
            info_nce_bwd(za, zb, inv_a, inv_b, row, col, vec, vec, vec, 10.0)
        else:  # NT-Xent over [a; b]: queries are keys, self excluded, positive M rows away
            z = torch.cat([za, zb])
            args = (10.0, 0, PAIRS, 2 * PAIRS, True)
            row, _, col, inv, _ = info_nce_fwd(z, z, *args)
            info_nce_bwd(z, z, inv, inv, row, col, vec.repeat(2), vec[:0], vec.repeat(2), *args)


# The CI subset: every dtype at head dim 64, 16-bit and fp32 at 32 and 128, the non-power-of-two
# head dim once, both layouts; InfoNCE in every dtype, both variants and both d regimes.
QUICK = [
    Case("partition_attention", "bf16", 64, "in_place"),
    Case("partition_attention", "fp16", 64, "packed"),
    Case("partition_attention", "fp32", 64, "in_place"),
    Case("partition_attention", "bf16", 32, "packed"),
    Case("partition_attention", "fp32", 32, "packed"),
    Case("partition_attention", "bf16", 128, "in_place"),
    Case("partition_attention", "fp32", 128, "packed"),
    Case("partition_attention", "bf16", 72, "in_place"),
    *(Case("info_nce", dtype, 128, "cross") for dtype in DTYPES),
    Case("info_nce", "bf16", 1000, "all"),
    Case("info_nce", "fp32", 1000, "all"),
]


def cases(quick: bool = False) -> list[Case]:
    """The full matrix (every dtype, head dim, layout; InfoNCE in every dtype, d and variant)
    or the CI subset :data:`QUICK`."""
    if quick:
        return list(QUICK)
    attention = [Case("partition_attention", dtype, head_dim, layout) for dtype in DTYPES
                 for head_dim in ATTENTION_HEAD_DIMS for layout in LAYOUTS]
    loss = [Case("info_nce", dtype, d, variant) for dtype in DTYPES for d in INFO_NCE_DIMS
            for variant in ("cross", "all")]
    return attention + loss


@dataclass(frozen=True)
class Job:
    """One compile: a recorded launch of a case with one candidate config, for one target."""

    case: Case
    launch: int  # index into case.launches()
    config: int  # index into the launch's candidate configs
    target: str


def candidates(kernel, args, kwargs) -> tuple[triton.JITFunction, list[dict]]:
    """The JIT function and the keyword sets it can be launched with: one per autotuning
    config left after the kernel's own pruning, or the launch's keywords as they are."""
    if not isinstance(kernel, Autotuner):
        return kernel, [dict(kwargs)]
    configs = kernel.configs
    if kernel.early_config_prune:
        named = dict(zip(kernel.arg_names, args, strict=False))  # the positional arguments
        configs = kernel.early_config_prune(configs, named, **kwargs)
    return kernel.fn, [{**kwargs, **c.all_kwargs()} for c in configs]


def _source(job: Job):
    """(kernel, keywords, ASTSource, target, options) of a job."""
    return source(job.case.launches()[job.launch], job.config, job.target)


def source(launch: Launch, config: int, target_name: str):
    """(kernel, keywords, ASTSource, target, options) of one candidate config of a launch for
    one target, specialised by the runtime's own binder (pointer alignment, integers divisible
    by 16, constexprs) as the launch would be; nothing is compiled."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, _, args, kwargs = launch
    fn, keyword_sets = candidates(kernel, args, kwargs)
    kwargs = keyword_sets[config]
    target = GPUTarget("cuda", TARGETS[target_name][0], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return fn, kwargs, ASTSource(fn, signature, constexprs, attrs), target, options


def jobs(case_list: list[Case]) -> list[Job]:
    """Every (case, launch, config, target), without repeats of the same compile (e.g. the
    norm kernel of both views)."""
    out, seen = [], set()
    for case in case_list:
        for i, (kernel, _, args, kwargs) in enumerate(case.launches()):
            for j in range(len(candidates(kernel, args, kwargs)[1])):
                for target in TARGETS:
                    job = Job(case, i, j, target)
                    compile_key = compile_hash(*_source(job)[2:])
                    if compile_key not in seen:
                        seen.add(compile_key)
                        out.append(job)
    return out


def compile_hash(src: ASTSource, target: GPUTarget, options) -> str:
    """What identifies one compile across cases, runs and machines: the kernel's source and
    specialisation, the launch options that vary, the target."""
    text = f"{src.hash()}-{options.num_warps}-{options.num_stages}-{target.arch}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_META = ("num_warps", "num_stages")


def compile_job(job: Job) -> dict:
    """Compile one job for its target; one result row."""
    from triton.knobs import nvidia

    fn, kwargs, src, target, options = _source(job)
    blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
    config = {**blocks, **{k: kwargs.get(k, getattr(options, k)) for k in _META}}
    log = io.StringIO()
    nvidia.dump_ptxas_log = True  # ptxas -v's report goes to stdout
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    report = log.getvalue()
    spills, regs = _PTXAS.search(report), _REGS.search(report)
    if not (spills and regs):
        raise RuntimeError(f"no ptxas report for {job} (compiled from a warm cache?)")
    ptx = compiled.asm["ptx"]
    return {
        **asdict(job.case),
        "launch": job.launch,  # which launch of the case (e.g. row or column statistics)
        "kernel": fn.__name__,
        "target": job.target,
        "config": config,
        "registers": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared_bytes": compiled.metadata.shared,
        "shared_limit": TARGETS[job.target][1],
        "mma": len(re.findall(r"\bmma\.sync\.", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        "compile_s": round(seconds, 2),
        "compile_hash": compile_hash(src, target, options),
    }


def run(case_list: list[Case], processes: int = 1) -> list[dict]:
    """Compile every job of ``case_list`` from a cold, private Triton cache (so ptxas runs and
    the compile times are honest); rows in job order."""
    work = jobs(case_list)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if processes <= 1:
            return [compile_job(job) for job in work]
        with ProcessPoolExecutor(processes) as pool:
            return list(pool.map(compile_job, work))


def key(row: dict) -> tuple:
    """What identifies a row across runs (everything but the measurements)."""
    config = tuple(sorted(row["config"].items()))
    return (row["op"], row["dtype"], row["size"], row["variant"], row["launch"], row["kernel"],
            row["target"], config)


MEASURED = ("registers", "spill_stores", "spill_loads", "shared_bytes", "mma", "wgmma")


def table(rows: list[dict]) -> str:
    """The README's summary: per op, kernel, target and dtype, the configs compiled, the most
    registers, the configs that spill (at power-of-two head dims / at the others), the most
    shared memory, and the range of tensor-core instructions per config (sm_90 uses ``wgmma``
    where Triton emits it, ``mma`` elsewhere)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["kernel"], row["target"], row["dtype"]), []).append(row)

    def span(values):
        return "-" if not max(values) else f"{min(values)}-{max(values)}"

    def spilling(group):
        return sum(1 for r in group if r["spill_stores"] or r["spill_loads"])

    lines = ["| op | kernel | target | dtype | configs | max regs | spilling (head dim 2^k / "
             "other) | max smem KiB | mma | wgmma |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, kernel, target, dtype), group in groups.items():
        odd = [r for r in group if op == "partition_attention" and r["size"] & (r["size"] - 1)]
        even = [r for r in group if r not in odd]
        lines.append(
            f"| {op} | `{kernel}` | {target} | {dtype} | {len(group)} | "
            f"{max(r['registers'] for r in group)} | "
            f"{spilling(even)} / {spilling(odd) if odd else '-'} | "
            f"{max(r['shared_bytes'] for r in group) / 1024:.0f} | "
            f"{span([r['mma'] for r in group])} | {span([r['wgmma'] for r in group])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spcl_fast.kernels.aot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset of the matrix")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: all cores)")
    parser.add_argument("--json", help="write the rows (and versions) to this file")
    args = parser.parse_args(argv)
    if _common.INTERPRET:
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels' compiler")
    start = time.perf_counter()
    rows = run(cases(args.quick), args.jobs)
    print(table(rows))
    print(f"{len(rows)} compiles in {time.perf_counter() - start:.0f} s with {args.jobs} "
          f"processes (triton {triton.__version__})", file=sys.stderr)
    if args.json:
        doc = {"triton": triton.__version__, "torch": torch.__version__, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
