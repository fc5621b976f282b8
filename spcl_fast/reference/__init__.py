"""Pure-PyTorch references: ground truth for tests, CPU fallbacks, benchmark baselines."""

from .info_nce import info_nce_ref
from .partition_attention import (
    partition_attention_ref,
    partition_attention_torch_bwd,
    partition_attention_torch_fwd,
)

__all__ = [
    "info_nce_ref",
    "partition_attention_ref",
    "partition_attention_torch_bwd",
    "partition_attention_torch_fwd",
]
