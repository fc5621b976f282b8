"""A plain Vision Transformer whose blocks run densely or on partition segments.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``pos_embed``,
``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``) so weights move
between the two. By default there is no class token: S-PCL pools each subset by its mean;
``class_token=True`` adds timm's ``cls_token`` (without a position embedding, timm's
``no_embed_class=True``), one per image and one per subset, whose output is the embedding.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import flops
from ..partition import PartitionPlan
from .attention import VarlenAttention

LAYOUTS = ("packed", "inplace")
PATCH_NORMS = ("none", "standardize", "standardize+stats")
PATCH_NORM_EPS = 1e-6  # added to each patch's variance, as MAE's normalised-pixel target does


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches through one linear map (a stride-``p`` convolution).

    ``patch_norm``: ``"none"``; ``"standardize"``: each patch (per channel) to zero mean and
    unit variance before the projection, so no token carries its patch's brightness or
    contrast; ``"standardize+stats"``: also the patch's per-channel mean and std as extra inputs
    of the projection (a ``stats`` linear added to the token: the same map as appending them to
    the pixels; timm has no such weights).

    ``forward(x (B, C, S, S)) -> (B, N, D)``; :meth:`project` takes any patch-multiple size and
    returns the ``(B, D, gh, gw)`` grid.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 patch_norm: str = "none"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if patch_norm not in PATCH_NORMS:
            raise ValueError(f"patch_norm must be one of {PATCH_NORMS}, got {patch_norm!r}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.patch_norm = patch_norm
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.stats = (nn.Linear(2 * in_chans, embed_dim) if patch_norm == "standardize+stats"
                      else None)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, D, H // p, W // p)``, the patches normalised first as
        ``patch_norm`` says."""
        if self.patch_norm == "none":
            return self.proj(x)
        p = self.patch_size
        b, c, gh, gw = x.shape[0], x.shape[1], x.shape[2] // p, x.shape[3] // p
        patches = x[..., : gh * p, : gw * p].unfold(2, p, p).unfold(3, p, p)  # (B,C,gh,gw,p,p)
        mean = patches.mean(dim=(-2, -1), keepdim=True)
        std = (patches.var(dim=(-2, -1), unbiased=False, keepdim=True) + PATCH_NORM_EPS).sqrt()
        normed = ((patches - mean) / std).permute(0, 1, 2, 4, 3, 5).reshape(b, c, gh * p, gw * p)
        out = self.proj(normed)
        if self.stats is not None:
            stats = torch.cat([mean, std], dim=1)[..., 0, 0]  # (B, 2C, gh, gw)
            out = out + self.stats(stats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}"
            )
        return self.project(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (dense mode only: a varlen row has no sample axis)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.dim() < 3:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device).bernoulli_(
            1 - self.p
        )
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: ``D``, the token width.
        num_heads: ``H`` attention heads (``D % H == 0``).
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        qkv_bias: bias in the ``qkv`` projection.
        drop_path: stochastic-depth rate (dense mode only).
        impl: varlen attention implementation (``"auto"|"triton"|"torch"``).

    ``forward(x, cu_seqlens=None, max_seqlen=None, token_index=None)`` returns ``x``'s shape
    and dtype: dense ``x (B, N, D)``, or ``x (R, D)`` rows that attend within the segments of
    ``cu_seqlens`` (``(S+1,)`` int32), packed or in place (see :class:`VarlenAttention`).

    Example::

        >>> from spcl_fast import sample_partitions
        >>> blk = Block(64, num_heads=2)
        >>> blk(torch.randn(2, 16, 64)).shape  # dense
        torch.Size([2, 16, 64])
        >>> plan = sample_partitions(2, 16, generator=torch.Generator().manual_seed(0))
        >>> rows = torch.randn(2 * 16, 64)[plan.token_index]  # packed: (T, D) in segment order
        >>> blk(rows, plan.cu_seqlens, plan.max_seqlen).shape
        torch.Size([32, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        impl: str = "auto",
    ):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = VarlenAttention(dim, num_heads, qkv_bias=qkv_bias, impl=impl)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, cu_seqlens=None, max_seqlen=None, token_index=None):
        x = x + self.drop_path(self.attn(self.norm1(x), cu_seqlens, max_seqlen, token_index))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE's), ``(grid_size**2, embed_dim)``.

    Args:
        embed_dim: ``D``, a multiple of 4: the first half of the channels encodes the column,
            the second half the row, each as ``D/4`` sines then ``D/4`` cosines.
        grid_size: ``G``, patches per side; row ``i`` is the patch at ``(i // G, i % G)``.

    Returns:
        ``(G*G, D)`` float32 (computed in float64).

    Example::

        >>> pe = sincos_pos_embed(8, grid_size=4)
        >>> pe.shape, pe.dtype
        (torch.Size([16, 8]), torch.float32)
        >>> pe[0].tolist()  # patch (0, 0): sin 0 and cos 0 for every frequency
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim % 4 == 0, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    parts = []
    for g in (gx, gy):  # half the channels for each axis
        angles = g.reshape(-1, 1) * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def resize_pos_embed(pos: torch.Tensor, grid: int, where: str = "pos_embed") -> torch.Tensor:
    """Resize ``(1, g*g, D)`` position embeddings to ``(1, grid*grid, D)`` bicubically (in fp32,
    differentiable: DINO's crops of other sizes train through it).

    Example::

        >>> resize_pos_embed(torch.randn(1, 16, 8), 6).shape
        torch.Size([1, 36, 8])
    """
    rows = pos.shape[1]
    old = math.isqrt(rows)
    if rows == 0 or old * old != rows:
        raise ValueError(f"{where}: {rows} position embeddings are not a square grid")
    if old == grid:
        return pos
    d = pos.shape[-1]
    img = pos.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos.dtype)


class VisionTransformer(nn.Module):
    """ViT encoder for 1-channel radiographs (any size that is a multiple of the patch).

    Args:
        img_size, patch_size, in_chans: input geometry, images ``(B, in_chans, S, S)`` float
            with ``S = img_size``; ``N = (img_size / patch_size) ** 2`` patch tokens per image.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT width and depth.
        pos_embed: ``"learned"`` (trunc-normal init), ``"sincos"`` (fixed, not trained) or
            ``"none"`` (zeros, not trained: the tokens carry no position, so every subset is a
            bag of patches; the weights still load into timm, whose ``pos_embed`` is then 0).
        drop_path_rate: stochastic depth, linearly increasing over blocks (dense mode only).
        impl: attention implementation for the varlen path (``"auto"|"triton"|"torch"``).
        class_token: prepend a learned token to every image and every subset; its final output
            is the pooled embedding instead of the token mean (``num_prefix_tokens`` = 1).
        patch_norm: per-patch input normalisation of :class:`PatchEmbed` (``"none"``,
            ``"standardize"``, ``"standardize+stats"``).

    Forward paths:
        * ``forward_features(images (B,C,S,S)) -> (B, P + N, D)``: all tokens (the
          ``P = num_prefix_tokens`` class token first), final norm applied.
        * ``forward(images) -> (B, D)``: the class token's output, or the mean over tokens.
        * ``forward_partitioned(images, plan, layout) -> (KB, D)``: each segment of ``plan``
          (with its own class token) encoded on its own, final-normed and pooled like
          ``forward``; row ``2b`` is subset A of image ``b``, row ``2b+1`` its subset B (``K``
          rows per image for a plan of ``K`` subsets).
        * ``forward_partitioned_tokens(images, plan, layout)``: the same pooled rows and
          the ``(T, D)`` outputs of the plan's patch tokens in packed order.
        * ``patch_tokens(images) -> (B, N, D)``: the patch tokens of ``forward_features``.
        * ``forward_tokens(x, cu_seqlens=None, max_seqlen=None, token_index=None)``: already
          embedded tokens (dense ``(B, L, D)`` or varlen rows) through the blocks and the final
          norm: the one token path, which the methods use for masks and crops too.
        * ``forward_flops(seqlens, num_images)``: the forward FLOPs of that path on segments
          of the given lengths (the methods' ``train_flops`` count the encoder with it).

    Outputs are in the parameters' dtype (the autocast dtype under autocast).

    Example::

        >>> from spcl_fast import sample_partitions
        >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
        >>> images = torch.rand(2, 1, 32, 32)  # B = 2, N = (32 / 8) ** 2 = 16
        >>> vit(images).shape, vit.forward_features(images).shape, vit.patch_tokens(images).shape
        (torch.Size([2, 64]), torch.Size([2, 16, 64]), torch.Size([2, 16, 64]))
        >>> plan = sample_partitions(2, 16, generator=torch.Generator().manual_seed(0))
        >>> z = vit.forward_partitioned(images, plan)  # rows 2b, 2b+1: subsets A, B of image b
        >>> z.shape, torch.allclose(z, vit.forward_partitioned(images, plan, "inplace"), atol=1e-5)
        (torch.Size([4, 64]), True)
        >>> cls_vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
        ...                             num_heads=2, class_token=True)
        >>> cls_vit.forward_features(images).shape, cls_vit.forward_partitioned(images, plan).shape
        (torch.Size([2, 17, 64]), torch.Size([4, 64]))
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: str = "learned",
        drop_path_rate: float = 0.0,
        impl: str = "auto",
        class_token: bool = False,
        patch_norm: str = "none",
    ):
        super().__init__()
        if pos_embed not in ("learned", "sincos", "none"):
            raise ValueError(
                f"pos_embed must be 'learned', 'sincos' or 'none', got {pos_embed!r}"
            )
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm)
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.num_prefix_tokens = int(class_token)
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.normal_(self.cls_token, std=0.02)
        if pos_embed == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed(embed_dim, self.patch_embed.grid_size)[None])
            self.pos_embed.requires_grad_(False)
        elif pos_embed == "none":
            self.pos_embed.requires_grad_(False)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], impl) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE/timm-style: xavier for linears (and the patch projection viewed as one), zero biases.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed(self, images: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        """Patch tokens with position embeddings, ``(B, N, D)``. ``any_size``: images of
        another patch-multiple side ``s`` give ``(B, (s/p)**2, D)``, the position embeddings
        resized bicubically to their grid (DINO's crops)."""
        if not any_size:
            return self.patch_embed(images) + self.pos_embed
        x = self.patch_embed.project(images)
        pos = resize_pos_embed(self.pos_embed, x.shape[-1])
        return x.flatten(2).transpose(1, 2) + pos.to(x.dtype)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, S, S)`` -> ``(B, P + N, D)``: every token's final-normed output, the
        class token first when there is one (``P = num_prefix_tokens``)."""
        x = self.embed(images)
        if self.num_prefix_tokens:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.forward_tokens(x)

    def forward_tokens(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       max_seqlen: int | None = None,
                       token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens through every block and the final norm (the token path every
        forward and method shares).

        Args:
            x: ``(B, L, D)`` dense tokens, or ``(R, D)`` rows of varlen segments.
            cu_seqlens, max_seqlen: the segments of the rows (``None``: dense).
            token_index: rows of ``x`` in segment order (the in-place layout), or ``None``.

        Returns:
            ``x``'s shape and dtype, final-normed.
        """
        for blk in self.blocks:
            x = blk(x, cu_seqlens, max_seqlen, token_index)
        return self.norm(x)

    def forward_flops(self, seqlens, num_images: int,
                      num_patches: int | None = None) -> dict[str, int]:
        """Forward FLOPs of this encoder on segments of ``seqlens`` patch tokens each (a class
        token adds one row to every segment), after embedding ``num_patches`` patches of each
        of ``num_images`` images (default: :attr:`num_patches`; a crop of another size has
        other counts). Parts as :func:`spcl_fast.flops.vit_forward_flops` returns them."""
        num_patches = self.num_patches if num_patches is None else num_patches
        in_chans = self.patch_embed.proj.in_channels
        parts = flops.vit_forward_flops(
            num_images=num_images, num_patches=num_patches,
            seqlens=[int(n) + self.num_prefix_tokens for n in seqlens],
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_hidden=self.blocks[0].mlp.fc1.out_features,
            patch_size=self.patch_embed.patch_size, in_chans=in_chans,
        )
        if self.patch_embed.stats is not None:  # its inputs need no gradient: 2x, like proj
            parts["patch_embed"] += flops.linear_flops(num_images * num_patches, 2 * in_chans,
                                                  self.embed_dim)
        return parts

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, S, S)`` -> ``(B, D)``: the class token's output, else the mean of
        the patch tokens of :meth:`forward_features`."""
        x = self.forward_features(images)
        return x[:, 0] if self.num_prefix_tokens else x.mean(dim=1)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)``: the final-normed outputs of the patch tokens only (dense tasks)."""
        return self.forward_features(images)[:, self.num_prefix_tokens:]

    def forward_partitioned(
        self, images: torch.Tensor, plan: PartitionPlan, layout: str = "packed"
    ) -> torch.Tensor:
        """Encode each segment of ``plan`` on its own; one pooled, final-normed row per segment.

        Args:
            images: ``(B, C, S, S)`` float.
            plan: a :class:`~spcl_fast.partition.PartitionPlan` for ``B`` images of
                ``N = num_patches`` tokens, on the images' device.
            layout: ``"packed"`` gathers the plan's ``T`` rows once and every block works on
                ``(T, D)``; ``"inplace"`` keeps all ``B*N`` rows in image order and gathers
                inside the attention kernel. Same result.

        Returns:
            ``(KB, D)``: row ``s`` pools segment ``s`` (its class token, else the mean of its
            tokens; an empty segment without a class token gives zeros).
        """
        return self.forward_partitioned_tokens(images, plan, layout)[0]

    def forward_partitioned_tokens(
        self, images: torch.Tensor, plan: PartitionPlan, layout: str = "packed"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_partitioned`'s pooled ``(KB, D)`` rows and the ``(T, D)`` final-normed
        outputs of the plan's patch tokens, in the plan's packed order (row ``t`` is token
        ``plan.token_index[t]``; class-token rows left out), for losses on single tokens."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        b = images.shape[0]
        if plan.num_images != b or plan.num_tokens != self.num_patches:
            raise ValueError(
                f"plan is for {plan.num_images} images of {plan.num_tokens} tokens, got {b} "
                f"images of {self.num_patches} tokens"
            )
        x = self.embed(images).reshape(b * self.num_patches, self.embed_dim)
        token_index, cu_seqlens, max_seqlen = plan.token_index, plan.cu_seqlens, plan.max_seqlen
        if self.num_prefix_tokens:
            # One class-token row per segment after the B*N patch rows, listed first in its
            # segment: both layouts then run unchanged on the longer plan.
            s = plan.num_segments
            x = torch.cat([x, self.cls_token.reshape(1, -1).expand(s, -1).to(x.dtype)])
            token_index, cu_seqlens, cls_rows, body = _with_prefix_rows(plan,
                                                                         b * self.num_patches)
            max_seqlen += 1
        if layout == "packed":
            x = x[token_index]  # gather once; every block then works on (T, D)
            index = None
        else:
            index = token_index
        x = self.forward_tokens(x, cu_seqlens, max_seqlen, index)
        if layout == "inplace":
            x = x[token_index]
        if self.num_prefix_tokens:
            return x[cls_rows], x[body]
        return segment_mean(x, plan), x


def _with_prefix_rows(plan: PartitionPlan, first_row: int):
    """The plan's ``token_index`` and ``cu_seqlens`` with row ``first_row + s`` put in front of
    segment ``s``, where those rows sit in the packed order, and where the plan's rows do."""
    s = plan.num_segments
    seg = torch.arange(s, device=plan.cu_seqlens.device)
    starts = plan.cu_seqlens[:-1].long() + seg  # packed position of each prefix row
    index = torch.empty(plan.total_tokens + s, dtype=plan.token_index.dtype,
                        device=plan.token_index.device)
    index[starts] = first_row + seg
    # every patch row moves down by its segment's number plus one (index math: no host sync)
    body = torch.arange(plan.total_tokens, device=index.device) + plan.segment_ids() + 1
    index[body] = plan.token_index
    cu = plan.cu_seqlens + torch.arange(s + 1, dtype=plan.cu_seqlens.dtype,
                                        device=plan.cu_seqlens.device)
    return index, cu, starts, body


def segment_mean(x: torch.Tensor, plan: PartitionPlan) -> torch.Tensor:
    """Mean of the packed rows of each segment; an empty segment pools to zeros.

    Args:
        x: ``(T, D)`` float, rows in the plan's packed (segment) order.
        plan: the :class:`~spcl_fast.partition.PartitionPlan` that defines the segments.

    Returns:
        ``(num_segments, D)`` in ``x``'s dtype.

    Example::

        >>> plan = PartitionPlan(torch.tensor([0, 3, 1, 2]),  # segments {0}, {3, 1, 2}, {}
        ...                      torch.tensor([0, 1, 4, 4], dtype=torch.int32), 3, 1, 4)
        >>> segment_mean(torch.tensor([[1.0], [2.0], [3.0], [7.0]]), plan).tolist()
        [[1.0], [4.0], [0.0]]
    """
    sums = x.new_zeros(plan.num_segments, x.shape[1]).index_add_(0, plan.segment_ids(), x)
    counts = plan.seqlens.clamp(min=1).to(x.dtype)[:, None]
    return sums / counts


PRESETS = {
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
}


def create_vit(name: str, img_size: int = 224, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """Build a preset by name; keyword arguments override any ``VisionTransformer`` argument.

    Args:
        name: a key of :data:`PRESETS` (``vit_{tiny,small,base,large}_patch16``): width, depth
            and heads.
        img_size, patch_size: input geometry (the names say "patch16"; ``patch_size`` wins).
        **kwargs: any other :class:`VisionTransformer` argument, preset values included.

    Returns:
        a freshly initialised float32 :class:`VisionTransformer`.

    Example::

        >>> vit = create_vit("vit_small_patch16", img_size=32, patch_size=8, depth=2)
        >>> vit.embed_dim, vit.num_heads, vit.depth, vit.num_patches
        (384, 6, 2, 16)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(PRESETS)}")
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, **{**PRESETS[name], **kwargs}
    )


def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    """ViT-Ti/16: width 192, depth 12, 3 heads; ``kwargs`` as in :func:`create_vit`.

    Example::

        >>> vit = vit_tiny_patch16(img_size=64)
        >>> vit.embed_dim, vit.depth, vit.num_heads, vit.num_patches
        (192, 12, 3, 16)
        >>> vit(torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 192])
    """
    return create_vit("vit_tiny_patch16", **kwargs)


def vit_small_patch16(**kwargs) -> VisionTransformer:
    """ViT-S/16: width 384, depth 12, 6 heads."""
    return create_vit("vit_small_patch16", **kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:
    """ViT-B/16: width 768, depth 12, 12 heads."""
    return create_vit("vit_base_patch16", **kwargs)


def vit_large_patch16(**kwargs) -> VisionTransformer:
    """ViT-L/16: width 1024, depth 24, 16 heads."""
    return create_vit("vit_large_patch16", **kwargs)
