"""Multi-head self-attention that runs either densely or inside partition segments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import partition_attention_qkvpacked


class VarlenAttention(nn.Module):
    """timm-compatible attention (parameters ``qkv`` and ``proj``) with a varlen mode.

    * Dense: ``forward(x)`` with ``x`` of shape ``(B, N, D)`` is ordinary self-attention
      (``scaled_dot_product_attention``), for downstream use of the encoder.
    * Varlen: ``forward(x, cu_seqlens, max_seqlen, token_index=None)`` with ``x`` of shape
      ``(R, D)``: tokens attend only within their segment (see
      :func:`spcl_fast.partition_attention_qkvpacked`, whose backward writes the ``qkv``
      projection's gradient as one buffer). With ``token_index=None`` the rows are packed in
      segment order; otherwise ``x`` holds all ``B*N`` tokens in image order (the in-place
      layout; a class-token encoder appends one row per segment after them) and rows in no
      segment come out as ``proj.bias``.

    Args:
        dim: ``D = H * Dh``, the token width.
        num_heads: ``H`` (``D % H == 0``).
        qkv_bias: bias in ``qkv`` (``Linear(D, 3D)``).
        impl: varlen kernel choice passed to :func:`spcl_fast.partition_attention`.

    ``cu_seqlens`` is ``(S+1,)`` int32, ``max_seqlen`` a host int and ``token_index`` ``(T,)``
    int64, as a :class:`~spcl_fast.partition.PartitionPlan` holds them. The output has ``x``'s
    shape and dtype.

    Example::

        >>> from spcl_fast import sample_partitions
        >>> attn = VarlenAttention(64, num_heads=2)
        >>> x = torch.randn(2, 16, 64)
        >>> attn(x).shape  # dense
        torch.Size([2, 16, 64])
        >>> plan = sample_partitions(2, 16, generator=torch.Generator().manual_seed(0))
        >>> rows = x.reshape(32, 64)
        >>> packed = attn(rows[plan.token_index], plan.cu_seqlens, plan.max_seqlen)
        >>> inplace = attn(rows, plan.cu_seqlens, plan.max_seqlen, plan.token_index)
        >>> packed.shape, torch.allclose(packed, inplace[plan.token_index], atol=1e-5)
        (torch.Size([32, 64]), True)
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if cu_seqlens is None:
            b, n, d = x.shape
            qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            return self.proj(out.transpose(1, 2).reshape(b, n, d))
        rows, d = x.shape
        qkv = self.qkv(x).view(rows, 3, self.num_heads, self.head_dim)
        out = partition_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, token_index,
                                            impl=self.impl)
        return self.proj(out.reshape(rows, d))
