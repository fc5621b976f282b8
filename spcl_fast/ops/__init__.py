"""Public ops: validated, documented, differentiable, dispatching to Triton or PyTorch."""

from .info_nce import info_nce
from .partition_attention import partition_attention, partition_attention_qkvpacked

__all__ = ["info_nce", "partition_attention", "partition_attention_qkvpacked"]
