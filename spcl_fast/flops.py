"""One FLOP formula per op, shared by the custom ops' FlopCounterMode registrations, the
benchmarks and the training reports.

Convention: a multiply-add counts as 2 FLOPs (what hardware peaks are quoted in). Vision papers'
"GFLOPs" are multiply-accumulates: ``macs = flops / 2``. Counts are algorithmic (the work the maths
needs), never the padding an implementation happens to compute.
"""

from __future__ import annotations

from collections.abc import Sequence

ATTENTION_BWD_FACTOR = 2.5  # backward: 5 matmuls (S, dV, dP, dQ, dK) vs the forward's 2


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """Forward FLOPs of ``rows`` tokens through a Linear layer (bias adds ignored)."""
    return 2 * rows * in_features * out_features


def attention_flops(seqlens: Sequence[int], num_heads: int, head_dim: int) -> int:
    """Forward FLOPs of non-causal attention inside segments of the given lengths:
    ``4 * sum(L^2) * H * Dh`` (``Q K^T`` and ``P V``)."""
    return 4 * sum(int(n) * int(n) for n in seqlens) * num_heads * head_dim


def attention_bwd_flops(seqlens: Sequence[int], num_heads: int, head_dim: int) -> int:
    """Backward FLOPs of :func:`attention_flops` (2.5x the forward)."""
    return int(ATTENTION_BWD_FACTOR * attention_flops(seqlens, num_heads, head_dim))


def info_nce_flops(num_queries: int, num_keys: int, dim: int) -> int:
    """Forward FLOPs of the similarity logits of an InfoNCE loss (one ``M x d @ d x M`` matmul)."""
    return 2 * num_queries * num_keys * dim


def vit_forward_flops(
    *,
    num_images: int,
    num_patches: int,
    seqlens: Sequence[int],
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_hidden: int,
    patch_size: int,
    in_chans: int = 1,
) -> dict[str, int]:
    """Forward FLOPs of a ViT encoder run on segments of the given lengths.

    The patch embedding sees all ``num_images * num_patches`` patches; the blocks see the
    ``sum(seqlens)`` tokens in segments (a dense forward is one segment of ``num_patches`` per
    image). Returns the parts: ``patch_embed``, ``linear`` (qkv, proj, MLP of all blocks) and
    ``attention``.
    """
    tokens = sum(int(n) for n in seqlens)
    d = embed_dim
    per_block = linear_flops(tokens, d, 3 * d) + linear_flops(tokens, d, d)
    per_block += linear_flops(tokens, d, mlp_hidden) + linear_flops(tokens, mlp_hidden, d)
    return {
        "patch_embed": linear_flops(num_images * num_patches, in_chans * patch_size**2, d),
        "linear": depth * per_block,
        "attention": depth * attention_flops(seqlens, num_heads, d // num_heads),
    }


def training_flops(forward: dict[str, int]) -> int:
    """Forward + backward FLOPs of a trained network from its forward parts.

    Linear layers cost 3x their forward (forward, input grad, weight grad); the patch
    embedding 2x (images need no grad); attention 1 + 2.5x; any other part 3x.
    """
    factors = {"patch_embed": 2.0, "attention": 1.0 + ATTENTION_BWD_FACTOR}
    return int(sum(v * factors.get(k, 3.0) for k, v in forward.items()))


INFO_NCE_BWD_FACTOR = 2  # backward: the two gradient matmuls (G @ B, G^T @ A) vs one forward


def info_nce_bwd_flops(num_queries: int, num_keys: int, dim: int) -> int:
    """Backward FLOPs of :func:`info_nce_flops` (2x the forward: the gradients of both sides)."""
    return INFO_NCE_BWD_FACTOR * info_nce_flops(num_queries, num_keys, dim)
