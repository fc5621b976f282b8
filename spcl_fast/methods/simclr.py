"""SimCLR baseline (Chen et al., 2020) on the shared ViT: the augmentation-based positive control.

Two random resized crops of every image, each with its own intensity jitter, go through the same
encoder (one dense batch of ``2B`` crops at the encoder's image size), are pooled (token mean,
or the class token when the encoder has one), projected by an MLP
(:class:`~spcl_fast.nn.heads.Projector`, as S-PCL's) and paired by the fused
:func:`spcl_fast.info_nce`. Chest-X-ray choices: mild crops (area ``crop_scale``,
default 0.5 to 1), gain/offset jitter only, no flip (laterality is meaningful), no colour or
blur. The crops come from :func:`~spcl_fast.views.sample_crops` (drawn on the host as a
:class:`~spcl_fast.views.CropPlan`, so the engine seeds and resumes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from .. import flops
from ..nn.heads import Projector
from ..nn.vit import VisionTransformer
from ..ops import info_nce
from ..sections import flag, require
from ..views import CropPlan, resized_crops, sample_crops
from .base import BuildContext


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR's settings (what each does: the SimCLR class docstring, docs/methods.md)."""

    crop_scale: Annotated[tuple[float, float], flag("simclr_scale")] = (0.5, 1.0)  # crop area
    jitter: Annotated[float, flag("simclr_jitter")] = 0.1  # simclr: intensity gain/offset
    temperature: Annotated[float, flag("simclr_temperature")] = 0.1  # simclr: InfoNCE
    proj_hidden: Annotated[int, flag("simclr_proj_hidden")] = 512  # simclr: projector width
    proj_dim: Annotated[int, flag("simclr_proj_dim")] = 128  # simclr: projector output size
    proj_depth: Annotated[int, flag("simclr_proj_depth")] = 1  # simclr: projector hidden layers

    def check(self, num_patches: int | None = None) -> None:
        """Raise ``ValueError`` naming the first setting no run can use (``num_patches``:
        the method contract's, unused)."""
        lo, hi = self.crop_scale
        require(self, {
            "crop_scale": (0 < lo <= hi <= 1, "(lo, hi) with 0 < lo <= hi <= 1"),
            "jitter": (math.isfinite(self.jitter) and self.jitter >= 0, ">= 0"),
            "temperature": (math.isfinite(self.temperature) and self.temperature > 0, "positive"),
            "proj_hidden": (self.proj_hidden >= 1, ">= 1"),
            "proj_dim": (self.proj_dim >= 1, ">= 1"),
            "proj_depth": (self.proj_depth >= 0, ">= 0"),
        })


class SimCLR(nn.Module):
    """Encoder + projector + InfoNCE between two augmented crops of each image.

    Args:
        encoder: a :class:`~spcl_fast.nn.VisionTransformer`; crops are resampled to its
            image size.
        config: the settings (:class:`SimCLRConfig`; ``None``: its defaults), checked here.
        context: what the run adds (:class:`~spcl_fast.methods.base.BuildContext`): with
            ``gather_distributed``, inside ``torch.distributed`` every process's embeddings
            are the negatives.

    What the settings do:

        crop_scale: area fraction ``(lo, hi)`` of each crop (aspect ratio in [3/4, 4/3]).
        jitter: intensity jitter, ``crop * exp(U(-j, j)) + U(-j, j)`` per crop (0: none).
        temperature: InfoNCE temperature.
        proj_hidden, proj_dim, proj_depth: projector width, output size and hidden layers.

    ``forward(images (B,C,S,S), generator=None, plan=None)`` returns ``loss`` (differentiable)
    and the detached ``acc`` (how often crop 1 of an image finds its crop 2 in the batch); it
    is :meth:`batch_loss` of :meth:`embed`, so gradient accumulation stays exact
    (:class:`~spcl_fast.methods.base.BatchLoss`).

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> model = SimCLR(vit_tiny_patch16(img_size=32, patch_size=8, depth=1),
        ...                SimCLRConfig(proj_hidden=32))
        >>> model(torch.rand(4, 1, 32, 32))["loss"].backward()
    """

    label = "SimCLR"  # in logs and plots
    Config = SimCLRConfig  # its settings, the ``simclr`` section of the training config

    def __init__(self, encoder: VisionTransformer, config: SimCLRConfig | None = None,
                 context: BuildContext | None = None):
        super().__init__()
        config = SimCLRConfig() if config is None else config
        config.check(encoder.num_patches)
        self.config, self.encoder = config, encoder
        self.projector = Projector(encoder.embed_dim, config.proj_hidden, config.proj_dim,
                                   config.proj_depth)
        self.gather_distributed = context is not None and context.gather_distributed

    @classmethod
    def from_config(cls, encoder: VisionTransformer, settings, context: BuildContext) -> SimCLR:
        """From the ``simclr`` config section (a dict of :class:`SimCLRConfig` fields); the
        loss spans every process's batch where the run says so."""
        return cls(encoder, SimCLRConfig(**settings), context)

    def sample_plan(self, batch_size: int, generator: torch.Generator | None, device,
                    images: torch.Tensor | None = None) -> CropPlan:
        """Two crops per image (``images`` is accepted for the method contract, unused)."""
        return sample_crops(batch_size, num_global=2, num_local=0,
                            global_scale=self.config.crop_scale, jitter=self.config.jitter,
                            flip_prob=0.0, generator=generator, device=device)

    def train_flops(self, plan: CropPlan) -> int:
        """Algorithmic FLOPs of one training step: encoder and projector on ``2B`` crops, the
        InfoNCE logits (crop resampling is elementwise: not counted)."""
        rows = plan.num_crops * plan.num_images
        n = self.encoder.num_patches
        parts = self.encoder.forward_flops([n] * rows, rows)
        linears = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
        parts["projector"] = sum(flops.linear_flops(rows, m.in_features, m.out_features)
                                 for m in linears)
        parts["loss"] = flops.info_nce_flops(plan.num_images, plan.num_images,
                                             linears[-1].out_features)
        return flops.training_flops(parts)

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        plan: CropPlan | None = None,
        embed_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``loss`` and ``acc`` (:meth:`batch_loss` of :meth:`embed`); ``embed_only``:
        :meth:`embed`'s output itself (:class:`~spcl_fast.methods.base.BatchLoss`)."""
        if plan is None:
            plan = self.sample_plan(images.shape[0], generator, images.device)
        embedded = self.embed(images, plan)
        return embedded if embed_only else self.batch_loss(embedded)

    def embed(self, images: torch.Tensor, plan: CropPlan) -> dict[str, torch.Tensor]:
        """``z (B, 2, d)``: each image's two projected crops, at least fp32."""
        b = images.shape[0]
        if plan.num_crops != 2 or plan.num_images != b:
            raise ValueError(f"plan has {plan.num_crops} crops of {plan.num_images} images, the "
                             f"model takes 2 crops of {b}")
        crops = resized_crops(images, plan.theta, plan.gain, plan.bias,
                              self.encoder.patch_embed.img_size)  # (2B, C, S, S), crop-major
        z = self.projector(self.encoder(crops))
        # at least fp32 into the loss, as S-PCL does (exact logged loss under bf16 autocast)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return {"z": z.view(2, b, -1).transpose(0, 1)}

    def batch_loss(self, embedded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """InfoNCE between the crops of :meth:`embed`'s ``z`` (one batch, or micro-batches
        joined along dim 0) and the retrieval accuracy ``acc``."""
        z_1, z_2 = embedded["z"].unbind(1)
        loss = info_nce(z_1, z_2, self.config.temperature,
                        gather_distributed=self.gather_distributed)
        with torch.no_grad():
            sim = nn.functional.normalize(z_1, dim=-1) @ nn.functional.normalize(z_2, dim=-1).T
            acc = (sim.argmax(dim=1) == torch.arange(len(z_1), device=sim.device)).float().mean()
        return {"loss": loss, "acc": acc}
