"""Shared benchmark plumbing: timing with device sync, environment stamps, result tables.

Every case calls :func:`run` with the function to time and its algorithmic FLOPs; rows collect
per suite and, at the end of the session, ``benchmarks/conftest.py`` prints one table per suite
(with each row's ratio to the suite's baseline rows of the same group) and writes
``<suite>-<device>.json`` to :data:`RESULTS_DIR`.

:data:`RESULTS_DIR` is the folder the user names (``pytest benchmarks/ --benchmark-only
--results-dir DIR``, or the environment variable ``SPCL_BENCH_RESULTS``), by default
``runs/benchmarks`` (git-ignored). The committed reference results in
:data:`REFERENCE_DIR` (``benchmarks/results``, which the docs' tables are generated from)
change only on purpose: ``--results-dir benchmarks/results``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).parent / "results"  # committed; rewritten only when named
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent.parent / "runs" / "benchmarks"
RESULTS_ENV = "SPCL_BENCH_RESULTS"
RESULTS_DIR = DEFAULT_RESULTS_DIR  # this session's: set by conftest.py from the options


def results_dir(option: str | None = None) -> Path:
    """Where a session writes: ``option`` (``--results-dir``), else ``$SPCL_BENCH_RESULTS``,
    else :data:`DEFAULT_RESULTS_DIR`."""
    return Path(option or os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS_DIR)
ROWS: dict[str, list[dict]] = defaultdict(list)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def device_slug(name: str) -> str:
    """File-name form of a :func:`device_name`."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def env_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            # gpu_check.sh's first call pins each kernel's first config (no autotuning)
            "autotune": os.environ.get("SPCL_FAST_AUTOTUNE", "1") not in ("", "0")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


@contextlib.contextmanager
def torch_threads(count: int | None):
    """``torch.set_num_threads(count)`` for the block (``None``: unchanged), then restored."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn, device: torch.device | str) -> float | None:
    """Peak extra device memory of one call of ``fn`` (CUDA only; ``None`` on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(
    benchmark,
    fn,
    *,
    suite: str,
    group: str,
    provider: str,
    device: torch.device | str,
    flops: float | None = None,
    items: float | None = None,
    item_name: str = "items",
    baseline: bool = False,
    rounds: int = 10,
    warmup: int = 3,
    memory_mb: float | None = None,
    cpu_time: bool = False,
    **params,
):
    """Time ``fn`` (synchronised) with pytest-benchmark and record one table row.

    ``group`` gathers rows that are compared (same shape and dtype); ``provider`` names the
    implementation; rows with ``baseline=True`` are the denominators of the printed ratios.
    ``flops`` is the algorithmic count from ``spcl_fast.flops`` (identical for every provider).
    ``cpu_time``: time in process CPU seconds instead of wall seconds (CPU rows on a shared
    machine, where other jobs stretch wall time).
    """
    if cpu_time:
        benchmark._timer = time.process_time  # pytest-benchmark's timer (--benchmark-timer)
    params["timer"] = "process_time" if cpu_time else "perf_counter"

    def timed():
        fn()
        synchronize(device)

    result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
    seconds = benchmark.stats.stats.median
    row = {
        "suite": suite,
        "group": group,
        "provider": provider,
        "baseline": baseline,
        "device": device_name(device),
        "median_ms": seconds * 1e3,
        "tflops": (flops / seconds / 1e12) if flops else None,
        "gflops": flops / 1e9 if flops else None,
        f"{item_name}_per_s": (items / seconds) if items else None,
        "peak_memory_mb": memory_mb,
        **params,
        **env_info(),
    }
    benchmark.extra_info.update(row)
    ROWS[suite].append(row)
    return result
