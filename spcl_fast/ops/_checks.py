"""Input validation shared by the public ops: clear errors that name the argument at fault."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_values(t: torch.Tensor) -> bool:
    """Whether to run value checks that read ``t``'s memory (a host sync on CUDA).

    They always run in eager mode on CPU; on CUDA only with ``SPCL_FAST_CHECKS=1``, since a
    sync per attention call would stall the GPU pipeline. They never run while compiling.
    """
    if torch.compiler.is_compiling():
        return False
    return not t.is_cuda or os.environ.get("SPCL_FAST_CHECKS", "0") not in ("", "0")


def require(cond: bool, op: str, message: str | Callable[[], str]) -> None:
    """Raise ``ValueError("<op>: <message>")`` unless ``cond``. Give the message as a callable
    when it formats sizes: under ``torch.compile`` those can be symbolic, and formatting them
    on every call (not only on failure) would break the graph."""
    if not cond:
        raise ValueError(f"{op}: {message() if callable(message) else message}")


def require_dtype(t: torch.Tensor, name: str, op: str, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must be one of {names}, got {t.dtype}")


def require_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")
