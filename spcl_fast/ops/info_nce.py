"""``info_nce``: the contrastive loss between two views' embeddings.

The PyTorch path computes the loss with :func:`spcl_fast.reference.info_nce_ref`.
"""

from __future__ import annotations

import math

import torch

from .._impl import resolve_impl
from ..reference.info_nce import NEGATIVES, info_nce_ref
from ._checks import FLOAT_DTYPES, require, require_dtype, require_same_device

OP = "info_nce"


def _validate(z_a, z_b, temperature, negatives, impl) -> None:
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(z, torch.Tensor) or z.dim() != 2:
            raise ValueError(f"{OP}: {name} must be an (M, d) tensor, got "
                             f"{getattr(z, 'shape', type(z))}")
    require(z_a.shape == z_b.shape, OP,
            f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    require(z_a.shape[0] >= 1 and z_a.shape[1] >= 1, OP,
            f"need at least one row and one feature, got {tuple(z_a.shape)}")
    allowed = FLOAT_DTYPES if impl == "triton" else FLOAT_DTYPES + (torch.float64,)
    require_dtype(z_a, "z_a", OP, allowed)
    require(z_a.dtype == z_b.dtype, OP, f"z_a and z_b must share a dtype, got {z_a.dtype} and "
            f"{z_b.dtype}")
    require_same_device(OP, z_a=z_a, z_b=z_b)
    require(isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0, OP, f"temperature must be a positive number, got {temperature!r}")
    require(negatives in NEGATIVES, OP, f"negatives must be one of {NEGATIVES}, got {negatives!r}")


def info_nce(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    symmetric: bool = True,
    negatives: str = "cross",
    gather_distributed: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean InfoNCE loss of the positive pairs ``(z_a[i], z_b[i])``.

    Args:
        z_a, z_b: ``(M, d)`` float16, bfloat16 or float32 (float64 with ``impl="torch"``);
            row ``i`` of ``z_a`` and row ``i`` of ``z_b`` are two views of one sample. Rows are
            L2-normalised inside.
        temperature: softmax temperature ``tau > 0`` of the cosine logits.
        symmetric: average the ``a -> b`` and ``b -> a`` directions (CLIP); else ``a -> b`` only.
        negatives: ``"cross"``: each query's candidates are the other view's M rows;
            ``"all"``: SimCLR's NT-Xent over the ``2M`` rows of both views, self excluded.
        gather_distributed: inside ``torch.distributed``, use every rank's rows as negatives.
        impl: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``spcl_fast._impl``).

    Returns:
        A scalar tensor in the input dtype, differentiable in ``z_a`` and ``z_b``.

    Example::

        >>> from spcl_fast import info_nce
        >>> z_a, z_b = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = info_nce(z_a, z_b, temperature=0.1)
        >>> loss.shape
        torch.Size([])
    """
    impl = resolve_impl(impl, z_a, OP)
    _validate(z_a, z_b, temperature, negatives, impl)
    if gather_distributed or impl == "triton":
        raise NotImplementedError(
            f"{OP}: {'gather_distributed' if gather_distributed else 'the triton path'} is not "
            "implemented yet; use impl='torch' without gather_distributed"
        )
    return info_nce_ref(z_a, z_b, temperature, symmetric, negatives)
