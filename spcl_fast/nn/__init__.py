"""Modules: partition-aware attention, transformer block, Vision Transformer."""

from .attention import VarlenAttention
from .vit import (
    PRESETS,
    Block,
    VisionTransformer,
    create_vit,
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
    "VarlenAttention",
    "VisionTransformer",
    "create_vit",
    "segment_mean",
    "sincos_pos_embed",
    "vit_base_patch16",
    "vit_large_patch16",
    "vit_small_patch16",
    "vit_tiny_patch16",
]
