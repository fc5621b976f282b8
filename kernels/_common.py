"""What every launcher shares: the dot-precision policy, output allocation, the device guard,
the autotuning switch, and the one call that launches a kernel (which the ahead-of-time
compiler of :mod:`spcl_fast.kernels.aot` intercepts, so it compiles exactly what runs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .._impl import triton_interpreting

# Read once: triton decides at decoration time too, so the flag cannot change afterwards.
INTERPRET = triton_interpreting()

# fp32 inputs run single-pass TF32 on tensor cores (Inf-CL's choice): "tf32x3" triples the MMA
# work and spills on sm_80, "ieee" runs on FMAs. 16-bit inputs ignore it. impl="torch" is the
# path for IEEE fp32.
DOT_PRECISION = tl.constexpr("tf32")

# SPCL_FAST_AUTOTUNE=0 runs each kernel's first config instead of benchmarking the candidates:
# quicker first calls, no benchmarking inside CUDA-graph capture, the same config in every process.
AUTOTUNE = os.environ.get("SPCL_FAST_AUTOTUNE", "1") not in ("", "0")

# Tests set this (or SPCL_FAST_POISON=1): outputs start as NaN, so a row a kernel forgets to
# write fails loudly instead of passing with whatever the allocator left there.
POISON_OUTPUTS = os.environ.get("SPCL_FAST_POISON", "0") not in ("", "0")


def configs(candidates, interpret_meta: dict) -> list[triton.Config]:
    """Autotuning candidates ``[(meta, num_warps, num_stages), ...]`` as ``triton.Config``s.

    Under the interpreter a single small config (``interpret_meta``) keeps tests fast.
    """
    if INTERPRET:
        return [triton.Config(interpret_meta, num_warps=1, num_stages=1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in candidates]


def tuned(fitting: list[triton.Config]) -> list[triton.Config]:
    """What a kernel's pruning hands the autotuner: the candidates that fit these inputs, or
    only the first of them with autotuning off."""
    return fitting if AUTOTUNE else fitting[:1]


def new_output(shape, like: torch.Tensor, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """An output buffer on ``like``'s device: zeros where a kernel leaves entries unwritten on
    purpose (``zero``), otherwise uninitialised (NaN when poisoning)."""
    if zero:
        return torch.zeros(shape, dtype=dtype, device=like.device)
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU, not the current one (``cuda:1`` tensors, ``cuda:0`` current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Set by spcl_fast.kernels.aot while it records launches instead of running them.
_recorder: Callable | None = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the inputs' device (or recorded for AOT compiles)."""
    if _recorder is not None:
        _recorder(kernel, grid, args, kwargs)
        return
    with device_guard(args[0]):
        kernel[grid](*args, **kwargs)
