"""The one place that decides which implementation an op runs: Triton kernels or plain PyTorch.

``impl="auto"`` picks Triton for CUDA tensors when Triton is importable and PyTorch otherwise;
the environment variable ``SPCL_FAST_IMPL`` (``auto``/``triton``/``torch``) overrides ``"auto"``
for a whole process. An explicit ``"triton"`` that cannot run raises instead of falling back, so a
benchmark or test never measures the wrong thing silently. On CPU tensors the Triton path runs
only under the interpreter (``TRITON_INTERPRET=1``, set before Triton is first imported).
"""

from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "torch")
ENV_VAR = "SPCL_FAST_IMPL"


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is an optional extra)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, tensor: torch.Tensor, op: str, triton_fits: bool = True) -> str:
    """Return ``"triton"`` or ``"torch"`` for running ``op`` on ``tensor``'s device.

    ``triton_fits=False`` says the kernel does not cover these inputs (e.g. a head dim outside
    its range): ``"auto"`` then picks the PyTorch path, while an explicit ``"triton"`` goes on
    to the op's own check, which names the limit.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when ``"triton"`` is asked for
    explicitly (argument or environment) but cannot run here.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(tensor, torch.Tensor):  # the op's own checks then name the argument
        return "torch"
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in IMPLS:
            raise ValueError(f"{op}: environment {ENV_VAR}={env!r} is not one of {IMPLS}")
        impl = env
    if impl == "torch":
        return "torch"
    can_run = triton_available() and (tensor.is_cuda or triton_interpreting())
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op}: impl='triton' needs the triton package (pip install 'spcl-fast[triton]')"
            )
        if not can_run:
            raise RuntimeError(
                f"{op}: impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                f"triton is imported to run the kernels on {tensor.device} tensors (slow)"
            )
        return "triton"
    return "triton" if (can_run and tensor.is_cuda and triton_fits) else "torch"
