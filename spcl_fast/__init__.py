"""spcl_fast: fused kernels and a thin training stack for S-PCL on chest X-rays."""

from .ops import info_nce, partition_attention, partition_attention_qkvpacked
from .partition import PartitionPlan, sample_partitions

__version__ = "0.1.0"

__all__ = [
    "PartitionPlan",
    "__version__",
    "info_nce",
    "partition_attention",
    "partition_attention_qkvpacked",
    "sample_partitions",
]
