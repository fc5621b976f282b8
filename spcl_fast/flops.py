"""One FLOP formula per op, shared by the custom ops' FlopCounterMode registrations, the
benchmarks and the training reports.

Convention: a multiply-add counts as 2 FLOPs (what hardware peaks are quoted in). Vision papers'
"GFLOPs" are multiply-accumulates: ``macs = flops / 2``. Counts are algorithmic (the work the maths
needs), never the padding an implementation happens to compute. Only matmuls, convolutions and
attention are counted (norms, activations, softmax, pooling and elementwise losses are not), which
is also what ``FlopCounterMode`` counts, so the two agree exactly on a training step.

A leaf: it imports no model code (ops, the ViT and the methods import it). The per-method counts
are in :mod:`spcl_fast.methods.train_flops`, the table's command in
:mod:`spcl_fast.run.flops_table`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils import flop_counter as fc

ATTENTION_BWD_FACTOR = 2.5  # backward: 5 matmuls (S, dV, dP, dQ, dK) vs the forward's 2


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """Forward FLOPs of ``rows`` tokens through a Linear layer (bias adds ignored):
    ``2 * rows * in_features * out_features``, a host int.

    Example::

        >>> linear_flops(4, 8, 16)
        1024
    """
    return 2 * rows * in_features * out_features


def attention_flops(seqlens: Sequence[int], num_heads: int, head_dim: int) -> int:
    """Forward FLOPs of non-causal attention inside segments of the given lengths:
    ``4 * sum(L^2) * H * Dh`` (``Q K^T`` and ``P V``), a host int.

    Args:
        seqlens: length ``L`` of each segment (ints, or a ``(S,)`` int tensor).
        num_heads: ``H``.
        head_dim: ``Dh``.

    Example::

        >>> attention_flops([3, 5], num_heads=2, head_dim=4)  # 4 * (9 + 25) * 2 * 4
        1088
    """
    return 4 * sum(int(n) * int(n) for n in seqlens) * num_heads * head_dim


def attention_bwd_flops(seqlens: Sequence[int], num_heads: int, head_dim: int) -> int:
    """Backward FLOPs of :func:`attention_flops` (2.5x the forward), same arguments; a host int.

    Example::

        >>> attention_bwd_flops([3, 5], num_heads=2, head_dim=4)
        2720
    """
    return int(ATTENTION_BWD_FACTOR * attention_flops(seqlens, num_heads, head_dim))


def info_nce_flops(num_queries: int, num_keys: int, dim: int) -> int:
    """Forward FLOPs of the similarity logits of an InfoNCE loss (one ``M x d @ d x M`` matmul):
    ``2 * num_queries * num_keys * dim``, a host int.

    Example::

        >>> info_nce_flops(4, 4, 8)
        256
    """
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

    Args:
        num_images, num_patches: ``B`` and ``N`` for the patch embedding.
        seqlens: length of each segment the blocks run on (ints).
        embed_dim, depth, num_heads, mlp_hidden: the encoder's ``D``, blocks, heads and MLP
            width.
        patch_size, in_chans: the patch embedding's kernel (``in_chans * patch_size**2`` inputs).

    Returns:
        ``{"patch_embed": int, "linear": int, "attention": int}`` forward FLOPs.

    Example::

        >>> vit_forward_flops(num_images=2, num_patches=4, seqlens=[2, 2, 2, 2], embed_dim=8,
        ...                   depth=1, num_heads=2, mlp_hidden=32, patch_size=2)
        {'patch_embed': 512, 'linear': 12288, 'attention': 512}
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

    Args:
        forward: ``{part: forward FLOPs}``, e.g. from :func:`vit_forward_flops`.

    Returns:
        total training FLOPs, a host int.

    Example::

        >>> training_flops({"patch_embed": 512, "linear": 12288, "attention": 512})
        39680
    """
    factors = {"patch_embed": 2.0, "attention": 1.0 + ATTENTION_BWD_FACTOR}
    return int(sum(v * factors.get(k, 3.0) for k, v in forward.items()))


INFO_NCE_BWD_FACTOR = 2  # backward: the two gradient matmuls (G @ B, G^T @ A) vs one forward


def info_nce_bwd_flops(num_queries: int, num_keys: int, dim: int) -> int:
    """Backward FLOPs of :func:`info_nce_flops` (2x the forward: the gradients of both sides),
    same arguments; a host int.

    Example::

        >>> info_nce_bwd_flops(4, 4, 8)
        512
    """
    return INFO_NCE_BWD_FACTOR * info_nce_flops(num_queries, num_keys, dim)


def transformer_blocks_flops(
    seqlens: Sequence[int], *, embed_dim: int, depth: int, num_heads: int, mlp_hidden: int
) -> dict[str, int]:
    """Forward FLOPs of ``depth`` pre-norm transformer blocks on segments of the given lengths
    (a dense ``(B, N, D)`` batch is ``[N] * B``): parts ``linear`` and ``attention``, as in
    :func:`vit_forward_flops` without the patch embedding (e.g. MAE's decoder).

    Returns:
        ``{"linear": int, "attention": int}`` forward FLOPs.

    Example::

        >>> transformer_blocks_flops([4, 4], embed_dim=8, depth=1, num_heads=2, mlp_hidden=32)
        {'linear': 12288, 'attention': 1024}
    """
    parts = vit_forward_flops(
        num_images=0, num_patches=0, seqlens=seqlens, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_hidden=mlp_hidden, patch_size=1,
    )
    return {"linear": parts["linear"], "attention": parts["attention"]}


def add_parts(*parts: dict[str, int]) -> dict[str, int]:
    """Sum FLOP breakdowns key by key (``training_flops`` weighs each key by its own factor).

    Args:
        *parts: ``{part: FLOPs}`` dicts.

    Returns:
        one ``{part: FLOPs}`` dict with the union of the keys.

    Example::

        >>> add_parts({"linear": 1, "attention": 2}, {"linear": 10, "patch_embed": 5})
        {'linear': 11, 'attention': 2, 'patch_embed': 5}
    """
    total: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            total[k] = total.get(k, 0) + v
    return total


# ---------------------------------------------------------------------------------------------
# FlopCounterMode: what it counts, and the one gap this module fills.
#
# FlopCounterMode counts matmuls (mm/addmm/bmm), convolutions and fused attention, forward and
# backward, and nothing else: LayerNorm, GELU, softmax, pooling, interpolation and elementwise
# losses are free. The analytic counts above use the same convention, so the two agree exactly
# on a training step. PyTorch registers formulas for the CUDA SDPA kernels (flash, efficient,
# cuDNN) but not for the CPU flash kernel that ``scaled_dot_product_attention`` runs on CPU; the
# registration below adds it with PyTorch's own formulas (backward = 2.5x forward, like
# ``attention_bwd_flops``), so dense attention counts the same on every device.


def register_cpu_sdpa_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention ops (idempotent; runs at import).

    Example::

        >>> register_cpu_sdpa_flop_formulas()  # a no-op the second time
        >>> q = torch.randn(1, 2, 4, 8)  # (B, H, L, Dh)
        >>> sdpa = torch.nn.functional.scaled_dot_product_attention
        >>> measure_flops(lambda: sdpa(q, q, q)) == attention_flops([4], 2, 8)
        True
    """
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args,
                          out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


register_cpu_sdpa_flop_formulas()  # at import, like the custom ops register theirs


def measure_flops(fn) -> int:
    """FLOPs ``FlopCounterMode`` counts while ``fn()`` runs (forward, and backward if ``fn``
    calls it).

    Args:
        fn: a callable taking no arguments; its return value is discarded.

    Returns:
        FLOPs counted (matmuls, convolutions, attention), a host int.

    Example::

        >>> import torch
        >>> lin = torch.nn.Linear(8, 4)
        >>> measure_flops(lambda: lin(torch.randn(2, 8))) == linear_flops(2, 8, 4)
        True
    """
    with fc.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
