"""MAE baseline (He et al., 2022) on the shared ViT: mask most patches, encode the visible ones,
reconstruct the hidden ones with a light decoder.

Follows the reference implementation (facebookresearch/mae ``models_mae.py``): per-image random
masking by argsort of uniform noise, the encoder sees only the visible tokens (with their
position embeddings), a decoder of ``decoder_depth`` blocks on all tokens (mask tokens in the
hidden places, fixed sin-cos position embeddings), a linear prediction of every patch's pixels
and a mean-squared error on the hidden patches only, against per-patch normalised pixels.
Every image keeps the same number of visible tokens, so the encoder runs densely on
``(B, N_vis, D)`` (``scaled_dot_product_attention``) and the decoder on ``(B, N, D_dec)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import flops
from ..nn.decoder import normalized_patches
from ..nn.vit import Block, VisionTransformer, sincos_pos_embed
from ..sections import require
from ..views import patchify
from .base import BuildContext


@dataclass(frozen=True)
class MaskPlan:
    """Which patches each image shows to the encoder.

    Attributes:
        ids_keep: ``(B, N_vis)`` int64, the visible patches of each image, ascending.
        num_tokens: ``N``, patches per image.
    """

    ids_keep: torch.Tensor
    num_tokens: int

    @property
    def num_images(self) -> int:
        return self.ids_keep.shape[0]

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    def mask(self) -> torch.Tensor:
        """``(B, N)`` bool, ``True`` where a patch is hidden (the loss's patches)."""
        hidden = torch.ones(self.num_images, self.num_tokens, dtype=torch.bool,
                            device=self.ids_keep.device)
        return hidden.scatter(1, self.ids_keep, False)

    def to(self, device: torch.device | str) -> MaskPlan:
        return MaskPlan(self.ids_keep.to(device, non_blocking=True), self.num_tokens)

    @classmethod
    def concat(cls, plans: Sequence[MaskPlan]) -> MaskPlan:
        """Masks of consecutive image ranges as one plan of all their images, in order."""
        return cls(torch.cat([p.ids_keep for p in plans]), plans[0].num_tokens)


def sample_mask(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskPlan:
    """A fresh random mask per image, ``N_vis = round(N * (1 - mask_ratio))`` visible patches
    (at least one).

    Example::

        >>> plan = sample_mask(2, 16, 0.75, torch.Generator().manual_seed(0))
        >>> plan.ids_keep.shape, int(plan.mask().sum())
        (torch.Size([2, 4]), 24)
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_visible = max(int(round(num_tokens * (1.0 - mask_ratio))), 1)
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=gen_device)
    ids_keep = noise.argsort(dim=1)[:, :num_visible].sort(dim=1).values
    return MaskPlan(ids_keep.to(device or gen_device), num_tokens)


@dataclass(frozen=True)
class MAEConfig:
    """MAE's settings (what each does: the MAE class docstring, docs/methods.md)."""

    mask_ratio: float = 0.75  # mae: fraction of patches hidden from the encoder
    decoder_dim: int = 512  # mae: decoder width
    decoder_depth: int = 8  # mae: decoder blocks
    decoder_heads: int = 16  # mae: decoder attention heads
    norm_pix_loss: bool = True  # mae: regress per-patch normalised pixels (else raw pixels)

    def check(self, num_patches: int | None = None) -> None:
        """Raise ``ValueError`` naming the first setting no run can use (``num_patches``:
        the method contract's, unused)."""
        require(self, {"mask_ratio": (0 <= self.mask_ratio < 1, "in [0, 1)"),
                       "decoder_dim": (self.decoder_dim >= 1, ">= 1"),
                       "decoder_depth": (self.decoder_depth >= 1, ">= 1"),
                       "decoder_heads": (self.decoder_heads >= 1, ">= 1")})


class MAE(nn.Module):
    """Masked autoencoder around a :class:`~spcl_fast.nn.VisionTransformer`.

    Args:
        encoder: the ViT to pre-train (its blocks and final norm encode the visible tokens).
        config: the settings (:class:`MAEConfig`; ``None``: its defaults), checked here.
        context: the run's :class:`~spcl_fast.methods.base.BuildContext` (unused: MAE needs
            nothing of it).

    What the settings do:

        mask_ratio: fraction of patches hidden from the encoder (0.75 in the paper).
        decoder_dim, decoder_depth, decoder_heads: decoder width, blocks and heads (512, 8, 16).
        norm_pix_loss: regress each patch's pixels normalised by the patch's own mean and
            variance (the paper's better setting) instead of the raw pixels.

    ``forward(images (B,C,S,S), generator=None, plan=None)`` returns a dict with ``loss``
    (scalar, differentiable: MSE on the hidden patches) and ``visible_mse`` (detached: the same
    error on the visible patches, which the loss ignores; a sanity number for the logs).

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=2)
        >>> model = MAE(enc, MAEConfig(decoder_dim=64, decoder_depth=1, decoder_heads=4))
        >>> out = model(torch.rand(2, 1, 32, 32))
        >>> out["loss"].backward()
    """

    label = "MAE"  # in logs and plots
    Config = MAEConfig  # its settings, the ``mae`` section of the training config

    def __init__(self, encoder: VisionTransformer, config: MAEConfig | None = None,
                 context: BuildContext | None = None):
        super().__init__()
        config = MAEConfig() if config is None else config
        config.check(encoder.num_patches)
        if encoder.num_prefix_tokens:
            raise ValueError("MAE here runs on an encoder without a class token "
                             "(class_token=False): it mean-pools the visible patches")
        self.config, self.encoder = config, encoder
        decoder_dim = config.decoder_dim
        pe = encoder.patch_embed
        self.patch_size, self.in_chans = pe.patch_size, pe.proj.in_channels
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed, as in MAE: the decoder must locate each hidden patch from its position alone.
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(decoder_dim, pe.grid_size)[None], persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, config.decoder_heads) for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, pe.patch_size**2 * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, encoder: VisionTransformer, settings, context: BuildContext) -> MAE:
        """From the ``mae`` config section (a dict of :class:`MAEConfig` fields; nothing of
        the run's context is needed)."""
        return cls(encoder, MAEConfig(**settings), context)

    def sample_plan(self, batch_size: int, generator: torch.Generator | None, device,
                    images: torch.Tensor | None = None) -> MaskPlan:
        """Random masks (``images`` is accepted for the common method contract, unused)."""
        return sample_mask(batch_size, self.encoder.num_patches, self.config.mask_ratio, generator,
                           device)

    def encode_visible(self, images: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """``(B, N_vis, D)``: the visible tokens through the encoder's blocks and final norm."""
        enc = self.encoder
        x = enc.embed(images)  # position embeddings go on before the tokens are dropped
        x = x.gather(1, plan.ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        return enc.forward_tokens(x)

    def decode(self, latent: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """``(B, N_vis, D)`` visible latents -> ``(B, N, p*p*C)`` pixels predicted for all
        patches."""
        x = self.decoder_embed(latent)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, plan.num_tokens, d)
        full = full.scatter(1, plan.ids_keep[..., None].expand(-1, -1, d), x)
        x = full + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, p*p*C)`` regression target: the pixels, normalised per patch when
        ``norm_pix_loss``."""
        if self.config.norm_pix_loss:
            return normalized_patches(images, self.patch_size)
        return patchify(images.float(), self.patch_size)

    @staticmethod
    def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the ``True`` patches of ``mask (B, N)`` of each patch's mean squared error."""
        per_patch = (pred.float() - target).square().mean(dim=-1)
        weight = mask.to(per_patch.dtype)
        return (per_patch * weight).sum() / weight.sum().clamp(min=1)

    def train_flops(self, plan: MaskPlan) -> int:
        """Algorithmic FLOPs of one training step on ``plan`` (forward + backward): the encoder
        on ``N_vis`` tokens per image (the patch embedding sees all ``N``, as in MAE), the
        decoder on all ``N``; the loss is elementwise (not counted, see ``spcl_fast.flops``)."""
        enc, b, n = self.encoder, plan.num_images, plan.num_tokens
        encoder = enc.forward_flops([plan.num_visible] * b, b)
        dim, blk = self.decoder_embed.out_features, self.decoder_blocks[0]
        decoder = flops.transformer_blocks_flops(
            [n] * b, embed_dim=dim, depth=len(self.decoder_blocks), num_heads=blk.attn.num_heads,
            mlp_hidden=blk.mlp.fc1.out_features,
        )
        heads = {"linear": flops.linear_flops(b * plan.num_visible, enc.embed_dim, dim)
                 + flops.linear_flops(b * n, dim, self.decoder_pred.out_features)}
        return flops.training_flops(flops.add_parts(encoder, decoder, heads))

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        plan: MaskPlan | None = None,
    ) -> dict[str, torch.Tensor]:
        if plan is None:
            plan = self.sample_plan(images.shape[0], generator, images.device)
        pred = self.decode(self.encode_visible(images, plan), plan)
        target, mask = self.target(images), plan.mask()
        loss = self.masked_mse(pred, target, mask)
        with torch.no_grad():
            visible = self.masked_mse(pred, target, ~mask)
        return {"loss": loss, "visible_mse": visible}
