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
    python -m spcl_fast.kernels.aot --from-json benchmarks/results/aot-3.9.0.json \
        --markdown docs/kernels.md                       # the docs' table of saved rows

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
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from . import _common
from .info_nce import bwd_designs, info_nce_bwd, info_nce_fwd
from .partition_attention import partition_attention_bwd, partition_attention_fwd

# Per-block shared memory (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
TARGETS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Attention at ViT shapes: 12 heads, 8 segments of a max_seqlen of tokens: the launchers pick
# kernels and tiles by it (the one-pass backward's tile is the power of two >= max_seqlen up to
# its largest; longer segments take the two-kernel backward), so the matrix spans them: 16 and
# 32 (small tiles), 49 (keep 0.5 at 196 patches), 100 (S-PCL's halves), 200 (whole images).
HEADS, SEGMENTS = 12, 16  # 16 segments: the packed token count is a multiple of 16, as at
#                          ViT batches (Triton specialises integer arguments divisible by 16)
TOKENS = (16, 32, 49, 100, 200)
ATTENTION_HEAD_DIMS = (32, 64, 72, 128)
LAYOUTS = ("packed", "in_place")
# InfoNCE at projector widths 128 and 1000 (rows kept in registers / streamed), and fp32 at 64
# (its widest resident backward rows: 128 streams in fp32, so only there does fp32 reach the
# recompute backward), over enough pairs that the stored-G backward takes several row chunks of
# G (the later ones accumulate into the key gradients: a kernel variant of its own).
PAIRS, INFO_NCE_DIMS, FP32_RESIDENT_DIM = 32768, (128, 1000), 64


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
    outer = _common._recorder  # a recording inside another one (the cost model's) gives it back
    _common._recorder = lambda *launch: recorded.append(Launch(*launch))
    try:
        yield recorded
    finally:
        _common._recorder = outer


@dataclass(frozen=True)
class Case:
    """One call of one op's launchers: the kernels it launches are compiled for each target."""

    op: str  # "partition_attention" or "info_nce"
    dtype: str
    size: int  # head dim for attention, feature size d for InfoNCE
    variant: str  # attention: layout; InfoNCE: "cross" (symmetric CLIP) or "all" (NT-Xent)
    tokens: int = 0  # attention: tokens per segment (= max_seqlen); InfoNCE: 0

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
        total = SEGMENTS * self.tokens
        cu = torch.arange(0, total + 1, self.tokens, dtype=torch.int32, device="meta")
        index = None
        if self.variant == "in_place":  # rows of a (B*N) tensor, half of them in no segment
            index = torch.empty(total, dtype=torch.int64, device="meta")
        rows = total if index is None else 2 * total
        # q, k, v: the three views of one (R, 3, H, Dh) qkv tensor, as a ViT block makes them.
        q, k, v = torch.empty(rows, 3, HEADS, head_dim, dtype=dtype, device="meta").unbind(1)
        scale = head_dim**-0.5
        out, lse = partition_attention_fwd(q, k, v, cu, self.tokens, index, scale)
        partition_attention_bwd(torch.empty_like(out), q, k, v, out, lse, cu, self.tokens, index,
                                scale)

    def _info_nce(self):
        """The forward, then the backward in every design the width admits (the launcher
        picks one per call by the cost model, so each can run), the stored G first."""
        dtype, d = DTYPES[self.dtype], self.size
        za, zb = (torch.empty(PAIRS, d, dtype=dtype, device="meta") for _ in range(2))
        vec = torch.empty(PAIRS, dtype=torch.float32, device="meta")
        if self.variant == "cross":  # CLIP's symmetric loss: row and column statistics
            row, _, col, inv_a, inv_b = info_nce_fwd(za, zb, 10.0, col_lse=True)
            bwd = (za, zb, inv_a, inv_b, row, col, vec, vec, vec, 10.0)
        else:  # NT-Xent over [a; b]: queries are keys, self excluded, positive M rows away
            z = torch.cat([za, zb])
            args = (10.0, 0, PAIRS, 2 * PAIRS, True)
            row, _, col, inv, _ = info_nce_fwd(z, z, *args)
            bwd = (z, z, inv, inv, row, col, vec.repeat(2), vec[:0], vec.repeat(2), *args)
        for design in bwd_designs(d, dtype):
            info_nce_bwd(*bwd, design=design)


# The CI subset: every dtype at head dim 64, 16-bit and fp32 at 32 and 128, the non-power-of-two
# head dim once, both layouts, the one-pass backward's tiles of 128 and 64 rows and the
# two-kernel backward (200 tokens); InfoNCE in every dtype, both variants and both d regimes,
# each backward design in each dtype (fp32's recompute backward at its resident 64).
QUICK = [
    Case("partition_attention", "bf16", 64, "in_place", 100),
    Case("partition_attention", "fp16", 64, "packed", 49),
    Case("partition_attention", "bf16", 64, "packed", 200),
    Case("partition_attention", "fp32", 64, "in_place", 49),
    Case("partition_attention", "fp32", 64, "packed", 200),
    Case("partition_attention", "bf16", 32, "packed", 100),
    Case("partition_attention", "fp32", 32, "packed", 200),
    Case("partition_attention", "bf16", 128, "in_place", 100),
    Case("partition_attention", "fp16", 128, "in_place", 200),
    Case("partition_attention", "fp32", 128, "packed", 200),
    Case("partition_attention", "bf16", 72, "in_place", 100),
    *(Case("info_nce", dtype, 128, "cross") for dtype in DTYPES),
    Case("info_nce", "bf16", 1000, "all"),
    Case("info_nce", "fp32", 1000, "all"),
    Case("info_nce", "fp32", FP32_RESIDENT_DIM, "all"),
]


def cases(quick: bool = False) -> list[Case]:
    """The full matrix (every dtype, head dim, layout; InfoNCE in every dtype, d and variant)
    or the CI subset :data:`QUICK`. The matrix starts with the subset, then bf16 (the cost
    model's dtype; attention at head dim 64 first), so a run cut short (``--json`` is saved as
    it goes) has those first."""
    if quick:
        return list(QUICK)
    attention = [Case("partition_attention", dtype, head_dim, layout, tokens) for dtype in DTYPES
                 for head_dim in ATTENTION_HEAD_DIMS for layout in LAYOUTS for tokens in TOKENS]
    loss = [Case("info_nce", dtype, d, variant)
            for dtype in DTYPES for d in INFO_NCE_DIMS + (FP32_RESIDENT_DIM,) * (dtype == "fp32")
            for variant in ("cross", "all")]
    rest = sorted((c for c in attention + loss if c not in QUICK),
                  key=lambda c: (c.dtype != "bf16", c.op == "partition_attention" and c.size != 64))
    return QUICK + rest


@dataclass(frozen=True)
class Job:
    """One compile: a recorded launch of a case with one candidate config, for one target."""

    case: Case
    launch: int  # index into case.launches()
    config: int  # index into the launch's candidate configs
    target: str
    compile_hash: str = ""  # :func:`compile_hash` of the compile


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
                        out.append(Job(case, i, j, target, compile_key))
    return out


def compile_hash(src: ASTSource, target: GPUTarget, options) -> str:
    """What identifies one compile across cases, runs and machines: the kernel's source and
    specialisation, the launch options that vary, the target."""
    text = f"{src.hash()}-{options.num_warps}-{options.num_stages}-{target.arch}"
    if getattr(options, "maxnreg", None) is not None:  # a launch's register ceiling for ptxas
        text += f"-maxnreg{options.maxnreg}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_META = ("num_warps", "num_stages")


def _identity(job: Job, fn, kwargs, options) -> dict:
    """What a row says about its compile, before any measurement."""
    blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
    config = {**blocks, **{k: kwargs.get(k, getattr(options, k)) for k in _META}}
    if getattr(options, "maxnreg", None) is not None:
        config["maxnreg"] = options.maxnreg
    return {
        **asdict(job.case),
        "launch": job.launch,  # which launch of the case (e.g. row or column statistics)
        "kernel": fn.__name__,
        "target": job.target,
        "config": config,
    }


def compile_job(job: Job) -> dict:
    """Compile one job for its target; one result row."""
    from triton.knobs import nvidia

    fn, kwargs, src, target, options = _source(job)
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
        **_identity(job, fn, kwargs, options),
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


def reused(job: Job, saved: dict) -> dict:
    """The row of a job whose very compile (same compile hash: kernel source with everything it
    calls, specialisation, options, target, Triton) was measured before, from that row."""
    fn, kwargs, _, _, options = _source(job)
    kept = ("registers", "spill_stores", "spill_loads", "shared_bytes", "shared_limit", "mma",
            "wgmma", "compile_s", "compile_hash")
    return {**_identity(job, fn, kwargs, options), **{k: saved[k] for k in kept}}


def run(case_list: list[Case], processes: int = 1, saved: dict | None = None,
        progress: Callable[[list[dict], int], None] | None = None) -> list[dict]:
    """Compile every job of ``case_list`` from a cold, private Triton cache (so ptxas runs and
    the compile times are honest), except those whose compile hash is a row of ``saved``
    (taken from there); rows in job order. ``progress`` sees the rows so far after each
    compile, and the number of compiles in all."""
    saved = saved or {}
    work = jobs(case_list)
    rows: dict[int, dict] = {i: reused(job, saved[job.compile_hash])
                             for i, job in enumerate(work) if job.compile_hash in saved}
    todo = [i for i in range(len(work)) if i not in rows]

    def done(i, row):
        rows[i] = row
        if progress:
            progress([rows[k] for k in sorted(rows)], len(work))

    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if processes <= 1:
            for i in todo:
                done(i, compile_job(work[i]))
        else:
            with ProcessPoolExecutor(processes) as pool:
                for i, row in zip(todo, pool.map(compile_job, [work[i] for i in todo]),
                                  strict=True):
                    done(i, row)
    return [rows[i] for i in range(len(work))]


def key(row: dict) -> tuple:
    """What identifies a row across runs (everything but the measurements)."""
    config = tuple(sorted(row["config"].items()))
    return (row["op"], row["dtype"], row["size"], row["variant"], row["tokens"], row["launch"],
            row["kernel"], row["target"], config)


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


def _save(path: str, rows: list[dict], compiles: int, quick: bool) -> None:
    doc = {"triton": triton.__version__, "torch": torch.__version__,
           "matrix": "quick" if quick else "full", "compiles": compiles, "rows": rows}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def summary(doc: dict) -> str:
    """The docs' block for a saved file: how much of its matrix it holds, then :func:`table`."""
    rows, compiles = doc["rows"], doc.get("compiles", len(doc["rows"]))
    held = ("all" if len(rows) == compiles else
            f"{len(rows)} (the CI subset first, then bf16; the run was cut short)")
    return (f"Triton {doc['triton']}, {doc.get('matrix', 'full')} matrix: {held} of its "
            f"{compiles} compiles.\n\n{table(rows)}")


MARKERS = ("<!-- aot-table:begin -->", "<!-- aot-table:end -->")


def write_between_markers(path: str, markers: tuple[str, str], block: str) -> None:
    """Replace what lies between the ``markers`` lines of the text file ``path`` by ``block``."""
    text = Path(path).read_text()
    begin, end = (re.escape(m) for m in markers)
    pattern = re.compile(f"{begin}\n.*?{end}", flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {markers[0]} ... {markers[1]} lines to write between")
    Path(path).write_text(pattern.sub(lambda _: f"{markers[0]}\n{block}\n{markers[1]}", text))


def between_markers(text: str, markers: tuple[str, str]) -> str:
    """What lies between the ``markers`` lines of ``text`` ('' if they are missing)."""
    parts = text.split(markers[0] + "\n", 1)
    return parts[1].split("\n" + markers[1], 1)[0] if len(parts) == 2 else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spcl_fast.kernels.aot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset of the matrix")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: all cores)")
    parser.add_argument("--json", help="write the rows (and versions) to this file")
    parser.add_argument("--from-json", help="compile nothing: the table of the rows that "
                        "--json saved to this file")
    parser.add_argument("--reuse", help="take the rows of compiles this earlier --json file "
                        "measured (same compile hash) instead of compiling them again; --json "
                        "is rewritten after every compile, so an interrupted run resumes")
    parser.add_argument("--markdown", help="also write the table into this file, between its "
                        f"{MARKERS[0]} and {MARKERS[1]} lines")
    args = parser.parse_args(argv)
    if args.from_json:
        try:
            doc = json.loads(Path(args.from_json).read_text())
            rows = doc["rows"]
        except (OSError, ValueError, KeyError) as e:
            parser.exit(1, f"error: {args.from_json}: cannot read saved rows ({e})\n")
    else:
        if _common.INTERPRET:
            parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels' compiler")
        saved = {}
        if args.reuse and Path(args.reuse).exists():
            earlier = json.loads(Path(args.reuse).read_text())
            if earlier["triton"] == triton.__version__:  # another Triton compiles differently
                saved = {r["compile_hash"]: r for r in earlier["rows"]}
        start = time.perf_counter()
        rows = run(cases(args.quick), args.jobs, saved,
                   (lambda so_far, n: _save(args.json, so_far, n, args.quick)) if args.json
                   else None)
        print(f"{len(rows)} rows, {len(rows) - sum(r['compile_hash'] in saved for r in rows)} "
              f"compiled in {time.perf_counter() - start:.0f} s with {args.jobs} processes "
              f"(triton {triton.__version__})", file=sys.stderr)
        doc = {"triton": triton.__version__, "matrix": "quick" if args.quick else "full",
               "compiles": len(rows), "rows": rows}
        if args.json:
            _save(args.json, rows, len(rows), args.quick)
    print(table(rows))
    if args.markdown:
        try:
            write_between_markers(args.markdown, MARKERS, summary(doc))
        except (OSError, ValueError) as e:
            parser.exit(1, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
