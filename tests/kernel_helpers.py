"""What the Triton kernel tests share (docs/architecture.md §5): where kernels run, NaN-poisoned
outputs, the error measure of the pass rule and the precision of the low-precision reference."""

from __future__ import annotations

import contextlib

import pytest
import torch

from spcl_fast._impl import triton_interpreting

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

needs_kernel = pytest.mark.skipif(
    not HAS_CUDA and not triton_interpreting(),
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every uninitialised launcher output starts as NaN: a row a kernel forgets to write shows
    up as NaN in the comparisons instead of passing with whatever the allocator left there."""
    try:
        from spcl_fast.kernels import _common
    except ImportError:  # no triton: the kernel tests skip anyway
        return
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference in fp64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.fixture
def bf16_dot_in_interpreter(monkeypatch):
    """Triton 3.9's interpreter multiplies the bf16 operands of ``tl.dot`` as their uint16 bit
    patterns (a GPU multiplies the numbers); widen them to fp32 first, which is exact."""
    if HAS_CUDA or not triton_interpreting():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, *args):
        return original(self, widen(a), widen(b), *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@contextlib.contextmanager
def reference_precision(dtype: torch.dtype):
    """The low-precision reference at the kernels' dot precision: fp32 kernels multiply in
    single-pass TF32 on a GPU, so the fp32 reference does too (the interpreter is exact)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = HAS_CUDA and dtype == torch.float32
    try:
        yield
    finally:
        matmul.allow_tf32 = before
