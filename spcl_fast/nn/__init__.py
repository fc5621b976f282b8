"""Modules: partition-aware attention, transformer block, Vision Transformer, and an adapter
that gives another codebase's ViT (timm's) partition-aware attention."""

from .adapter import PartitionAdapter, pool_segments
from .attention import VarlenAttention
from .vit import (
    PRESETS,
    Block,
    VisionTransformer,
    create_vit,
    resize_pos_embed,
    segment_mean,
    sincos_pos_embed,
    vit_base_patch16,
    vit_large_patch16,
    vit_small_patch16,
    vit_tiny_patch16,
)

__all__ = [
    "PRESETS",
    "Block",
    "PartitionAdapter",
    "VarlenAttention",
    "VisionTransformer",
    "create_vit",
    "pool_segments",
    "resize_pos_embed",
    "segment_mean",
    "sincos_pos_embed",
    "vit_base_patch16",
    "vit_large_patch16",
    "vit_small_patch16",
    "vit_tiny_patch16",
]
