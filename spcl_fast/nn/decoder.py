"""A light pixel decoder and its target: the masked-modelling pieces the methods share.

* :class:`PixelDecoder`: encoder token outputs (projected to a narrow width) and mask tokens,
  each plus a fixed sine-cosine position embedding, through a few transformer blocks and a
  linear prediction of each patch's pixels (MAE's decoder design; S-PCL's reconstruction term
  runs it on varlen segments).
* :func:`normalized_patches`: each patch's pixels standardised over the patch (MAE's
  ``norm_pix_loss`` target).
"""

from __future__ import annotations

import torch
from torch import nn

from ..views import patchify
from .vit import Block, sincos_pos_embed


def normalized_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, S, S)`` -> ``(B, N, p*p*C)`` float: the patches (:func:`~spcl_fast.views.patchify`
    order), each standardised by its own mean and (unbiased) variance, ``+ 1e-6`` under the root.

    Example::

        >>> t = normalized_patches(torch.rand(2, 1, 16, 16), 8)
        >>> t.shape, bool(t.mean(-1).abs().max() < 1e-5)
        (torch.Size([2, 4, 64]), True)
    """
    t = patchify(images.float(), patch_size)
    return (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5


class PixelDecoder(nn.Module):
    """``embed`` (encoder width to ``dim``), a learned ``mask_token``, fixed sine-cosine
    position embeddings ``pos_embed (N, dim)`` of the patch grid, ``depth`` pre-norm blocks of
    ``num_heads`` heads, a final ``norm`` and ``pred``, a linear map to ``out_dim`` pixels.

    The caller assembles the decoder's input rows (``embed`` of context tokens or
    ``mask_token``, each ``+ pos_embed`` of its patch); ``forward(x, cu_seqlens=None,
    max_seqlen=None, select=None)`` runs the blocks on them (dense ``(B, L, dim)``, or ``(R,
    dim)`` rows attending within the segments of ``cu_seqlens``) and predicts the pixels of
    the rows ``select`` picks (all of them when ``None``).

    Example::

        >>> dec = PixelDecoder(32, 16, depth=1, num_heads=2, grid_size=4, out_dim=64)
        >>> x = dec.mask_token + dec.pos_embed  # every patch from its position alone
        >>> dec(x[None]).shape
        torch.Size([1, 16, 64])
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid_size: int,
                 out_dim: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PixelDecoder: dim {dim} is not a multiple of {num_heads} heads")
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))  # 1-D: no weight decay, as norms
        # fixed, as MAE's: a mask token is located by its position alone
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid_size), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.embed, self.pred, *self.blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, cu_seqlens, max_seqlen)
        if select is not None:
            x = x[select]
        return self.pred(self.norm(x))
