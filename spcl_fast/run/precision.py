"""Mixed precision: the autocast context of each ``precision`` and fp16's gradient scaler.

* ``auto`` (evaluation's default): ``bf16`` on GPUs that have it, ``fp16`` on older GPUs,
  ``fp32`` on CPU (:func:`resolve_precision`).
* ``fp32``: no autocast (on a GPU, matmuls follow ``torch.set_float32_matmul_precision``).
* ``bf16``: ``torch.autocast(dtype=bfloat16)`` around the forward; weights, gradients and the
  optimizer stay fp32. bf16 has fp32's exponent range, so no loss scaling is needed. Works on
  CPU too (how it is tested here).
* ``fp16``: autocast to float16 plus a ``GradScaler`` (dynamic loss scaling; its state is part
  of the checkpoint). A step whose scaled gradients overflow is the scaler's business: it is
  skipped and the scale lowered, but it is not counted as a bad (non-finite) step.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with ``"auto"`` decided for ``device``; unknown names raise."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    return precision


def autocast(precision: str, device: torch.device):
    """The context the forward runs in: autocast to the precision's dtype, or nothing."""
    dtype = PRECISIONS[resolve_precision(precision, device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for fp16, ``None`` otherwise."""
    return torch.amp.GradScaler(device.type) if resolve_precision(precision, device) == "fp16" \
        else None
