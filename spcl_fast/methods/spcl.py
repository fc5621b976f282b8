"""S-PCL: semantic-partitioned contrastive learning.

The patch tokens of each image are split at random into two disjoint subsets (or more); the
same encoder embeds each subset on its own (varlen attention inside the subset), a projector
maps the pooled embeddings, and InfoNCE pulls the subsets of an image together and pushes other
images' apart. No augmentations, no decoder, no momentum encoder.

Options beside that loss: I-JEPA-style ``partition="anatomy"`` (subset B a few rectangular
blocks of anatomy, subset A the context around them), an intra-image term (``intra_weight``:
ConMIM / Siamese Image Modeling's token-level contrast, whose negatives are other positions of
the same image, so image-level cues such as exposure, pose or body size cannot solve it) and
OCL's one shared mild crop per image before partitioning (``crop_scale``).

OCL's recipe (Yang et al., ICML 2025: few kept tokens, the final-normed class token straight
into a bounded-similarity loss) is ``keep=0.1`` (its mask ratio 0.9), ``class_token=True,
projector="none", similarity="bounded", temperature=0.07``; few tokens per image need more kept
(the recipe study's ``spcl_ocl`` keeps 0.2).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import collectives, flops
from ..nn.decoder import PixelDecoder, normalized_patches
from ..nn.heads import Projector
from ..nn.vit import Mlp, VisionTransformer
from ..ops import info_nce
from ..partition import PartitionPlan, sample_partitions
from ..sections import require
from ..views import patchify, resized_crops, sample_crops
from .base import BuildContext
from .losses import (
    bounded_info_nce,
    intra_image_nce,
    multi_positive_nce,
    vicreg_covariance,
    vicreg_variance,
)


class TokenPredictor(nn.Module):
    """One cross-attention layer + MLP that predicts tokens of one subset from another's
    (the intra-image term): queries are a learned mask token plus the position embedding of
    each queried position, keys and values the context subset's final-normed token outputs.

    ``forward(pos (B, q, D), kv (B, L, 2D), context_valid (B, L) bool) -> (B, q, D)``;
    padded context rows (``False``) get no attention (an image with no context row attends to
    its padding: its queries must be masked out of the loss).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TokenPredictor: dim {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.mask_token = nn.Parameter(torch.zeros(dim))  # 1-D: no weight decay, as norms
        nn.init.normal_(self.mask_token, std=0.02)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, pos: torch.Tensor, kv: torch.Tensor,
                context_valid: torch.Tensor) -> torch.Tensor:
        """``kv (B, L, 2D)``: :attr:`kv` of the context tokens (applied by the caller to the
        packed tokens once, before padding: each token is a context once per direction)."""
        b, q, d = pos.shape
        h = self.num_heads
        x = self.mask_token + pos
        queries = self.q(self.norm1(x)).view(b, q, h, d // h).transpose(1, 2)  # (B, H, q, Dh)
        k, v = kv.view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        # plain matmuls, not a fused kernel: the (B, H, q, L) scores are small and the FLOP
        # count of train_flops is then exactly what runs
        scores = queries @ k.transpose(-2, -1) * (d // h) ** -0.5
        allowed = context_valid | ~context_valid.any(dim=1, keepdim=True)
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        attn = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, q, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


# what the other films of a film's patient in the batch are to it (SPCLConfig.same_patient)
SamePatient = Literal["negative", "exclude", "positive"]


@dataclass(frozen=True)
class SPCLConfig:
    """S-PCL's settings (what each does: the SPCL class docstring, docs/methods.md)."""

    ratio: float = 0.5  # fraction of an image's kept tokens in subset A
    ratio_range: tuple[float, float] | None = None  # draw the ratio per image from [lo, hi]
    keep: float = 1.0  # fraction of tokens used at all (the rest are in neither subset)
    block_size: int = 1  # assign k x k blocks of patches to subsets together (1: single tokens)
    shared_split: bool = False  # one split for the whole batch (no position-pattern shortcut)
    num_subsets: int = 2  # subsets per image (>2: equal sizes, loss averaged over all pairs)
    partition: Literal["random", "anatomy"] = "random"  # anatomy: B = target blocks, A = rest
    target_blocks: int = 4  # anatomy: rectangular target blocks of the patch grid in subset B
    target_scale: tuple[float, float] = (0.15, 0.2)  # anatomy: area fraction of each block
    intra_weight: float = 0.0  # weight of the intra-image token contrast (0: off)
    intra_queries: int = 16  # intra-image: positions of each subset predicted per image
    intra_temperature: float = 0.1  # intra-image: temperature of its cross-entropy
    intra_negatives: Literal["image", "batch"] = "image"  # intra: negatives of its image | all
    intra_target: Literal["tokens", "pixels"] = "tokens"  # intra: predict tokens | patch pixels
    crop_scale: tuple[float, float] | None = None  # shared crop per image, area [lo, hi]
    subset_jitter: float = 0.0  # independent intensity jitter per subset while training (0: off)
    subset_warp: float = 0.0  # independent small affine warp per subset while training (0: off)
    background_std: float = 0.0  # skip patches flatter than this x the image's std (0: off)
    temperature: float = 0.1  # InfoNCE temperature
    similarity: Literal["cosine", "bounded"] = "cosine"  # logits: cos/T | OCL's bounded form
    kappa: float = 1 / 64  # bounded similarity: 0.5 (1 + c) / (1 + kappa (1 - c)) / T
    negatives: Literal["cross", "all"] = "cross"  # InfoNCE: cross (CLIP) | all (SimCLR NT-Xent)
    symmetric: bool = True  # InfoNCE: average both directions (A finds B, B finds A)
    vicreg_var: float = 0.0  # weight of VICReg's variance term on the subset embeddings
    vicreg_cov: float = 0.0  # weight of VICReg's covariance term on the subset embeddings
    projector: Literal["mlp", "none"] = "mlp"  # none: pooled encoder output into the loss
    proj_hidden: int = 512  # projector hidden width
    proj_dim: int = 128  # projector output size
    proj_depth: int = 1  # projector hidden layers
    predictor_hidden: int = 0  # width of an MLP predictor on one branch (0: none)
    layout: Literal["packed", "inplace"] = "packed"  # residual stream layout
    same_patient: SamePatient = "negative"  # same-patient films: negatives | left out | positives
    recon_weight: float = 0.0  # weight of each subset predicting the other's pixels (0: off)
    recon_dim: int = 128  # reconstruction: decoder width
    recon_depth: int = 2  # reconstruction: decoder blocks
    recon_heads: int = 4  # reconstruction: decoder attention heads
    pair_across: bool = False  # negative control: image i's subsets paired with image i-1's

    def check(self, num_patches: int | None = None) -> None:
        """Raise ``ValueError`` naming the first setting no run can use (``num_patches``: the
        encoder's patches per image, which bound ``num_subsets``; ``None``: unknown)."""
        lo_hi, crop, anatomy = self.ratio_range, self.crop_scale, self.partition == "anatomy"
        blocks_lo, blocks_hi = self.target_scale
        finite = math.isfinite
        require(self, {
            "keep": (0 < self.keep <= 1, "in (0, 1]"),
            "ratio": (0 < self.ratio < 1, "in (0, 1)"),
            "ratio_range": (lo_hi is None or 0 < lo_hi[0] <= lo_hi[1] < 1,
                            "(lo, hi) with 0 < lo <= hi < 1"),
            "block_size": (self.block_size >= 1, ">= 1"),
            "num_subsets": (2 <= self.num_subsets <= (num_patches or self.num_subsets),
                            "from 2 to the number of patches"),
            "temperature": (finite(self.temperature) and self.temperature > 0, "positive"),
            "kappa": (finite(self.kappa) and self.kappa >= 0, ">= 0 and finite"),
            "negatives": (self.similarity == "cosine" or self.negatives == "cross",
                          "'cross' with similarity 'bounded'"),
            "vicreg_var": (finite(self.vicreg_var) and self.vicreg_var >= 0, ">= 0"),
            "vicreg_cov": (finite(self.vicreg_cov) and self.vicreg_cov >= 0, ">= 0"),
            "proj_hidden": (self.proj_hidden >= 1, ">= 1"),
            "proj_dim": (self.proj_dim >= 1, ">= 1"),
            "proj_depth": (self.proj_depth >= 0, ">= 0"),
            "predictor_hidden": (self.predictor_hidden >= 0, ">= 0 (0: none)"),
            "target_blocks": (self.target_blocks >= 1, ">= 1"),
            "target_scale": (0 < blocks_lo <= blocks_hi < 1, "(lo, hi) with 0 < lo <= hi < 1"),
            "intra_weight": (finite(self.intra_weight) and self.intra_weight >= 0,
                             ">= 0 (0: off)"),
            "intra_queries": (self.intra_queries >= 1, ">= 1"),
            "intra_temperature": (finite(self.intra_temperature) and self.intra_temperature > 0,
                                  "positive"),
            "crop_scale": (crop is None or 0 < crop[0] <= crop[1] <= 1,
                           "(lo, hi) with 0 < lo <= hi <= 1, or None (off)"),
            "background_std": (finite(self.background_std) and self.background_std >= 0,
                               ">= 0 (0: off)"),
            "recon_weight": (finite(self.recon_weight) and self.recon_weight >= 0,
                             ">= 0 (0: off)"),
            "recon_dim": (self.recon_dim >= 1, ">= 1"),
            "recon_depth": (self.recon_depth >= 1, ">= 1"),
            "recon_heads": (self.recon_heads >= 1 and self.recon_dim % self.recon_heads == 0,
                            f"a divisor of recon_dim ({self.recon_dim})"),
        })
        # what partition='anatomy' (its blocks size the subsets), more than two subsets (of
        # equal size) and the intra-image term (subset B from A and back) rule out
        equal = anatomy or self.num_subsets > 2
        require(self, {
            "ratio": (not equal or self.ratio == 0.5,
                      "0.5 (unset) with partition 'anatomy' or num_subsets > 2"),
            "ratio_range": (not equal or lo_hi is None,
                            "None with partition 'anatomy' or num_subsets > 2"),
            "block_size": (not anatomy or self.block_size == 1, "1 with partition 'anatomy'"),
            "num_subsets": ((not anatomy and self.intra_weight == 0) or self.num_subsets == 2,
                            "2 with partition 'anatomy' or intra_weight > 0"),
            "pair_across": (not self.pair_across or self.same_patient == "negative",
                            "False with same_patient other than 'negative'"),
        })


class SPCL(nn.Module):
    """Encoder + projector + InfoNCE over the subsets of each image (two by default).

    Args:
        encoder: a :class:`~spcl_fast.nn.VisionTransformer`.
        config: the settings (:class:`SPCLConfig`; ``None``: its defaults), checked here.
        context: what the run adds (:class:`~spcl_fast.methods.base.BuildContext`): with
            ``gather_distributed``, inside ``torch.distributed`` every process's embeddings
            are the negatives (the loss sees the global batch), and the logged numbers too.

    What the settings do:

        proj_hidden, proj_dim, proj_depth: projector width, output size and hidden layers.
        projector: ``"mlp"`` (a :class:`~spcl_fast.nn.heads.Projector`) or ``"none"``: the pooled,
            final-normed encoder output goes straight into the loss (OCL; ``proj_*`` unused).
        temperature: InfoNCE temperature.
        similarity: the loss's logits: ``"cosine"`` (``cos / temperature``, the fused
            :func:`spcl_fast.info_nce`) or ``"bounded"`` (OCL's ``0.5 (1 + cos) / (1 + kappa
            (1 - cos)) / temperature``, :func:`~spcl_fast.methods.losses.bounded_info_nce`;
            cross negatives, one process's batch).
        kappa: the bounded similarity's ``kappa`` (OCL: 1/64).
        vicreg_var, vicreg_cov: weights of VICReg's variance and covariance terms on each
            subset's embeddings (the loss's inputs), averaged over subsets and added to the
            contrastive loss (0: off).
        ratio, ratio_range, keep, block_size, shared_split, num_subsets: subset sizes, shapes
            and number per image (see :func:`spcl_fast.sample_partitions`). With
            ``num_subsets = K > 2`` the loss is the mean InfoNCE over the ``K (K-1) / 2`` pairs
            of subsets of each image.
        partition, target_blocks, target_scale: ``"random"`` splits, or ``"anatomy"``: subset
            B is ``target_blocks`` rectangles of the patch grid of area fraction
            ``U(target_scale)`` each, subset A the rest; ``keep < 1`` thins each subset at
            random to keep that fraction of it (see :func:`spcl_fast.sample_partitions`).
        intra_weight: weight of the intra-image term (0: off; two subsets only). For each
            image, ``intra_queries`` positions of subset B are drawn; a
            :class:`TokenPredictor` (the encoder's width; queries: a mask token plus the
            position embedding of each drawn position) cross-attends to subset A's
            final-normed token outputs and predicts each drawn token's final-normed output;
            :func:`~spcl_fast.methods.losses.intra_image_nce` makes each prediction pick its
            own target among the drawn positions of its image. The same runs from B to A, and
            the term is the mean of both directions (so one-directional cross-entropy is
            enough: the pair is symmetric). Targets are not detached (one encoder, no momentum
            copy; the negatives keep it from collapsing). An image whose subset has fewer
            tokens than ``intra_queries`` queries all of them (clamped, never an error). The
            positions are drawn with ``generator`` (the global RNG when ``None``, as the
            trainer runs it: its state is checkpointed). Needs position embeddings.
        intra_queries, intra_temperature: drawn positions per image and subset, and the
            intra-image term's temperature.
        intra_target: what each drawn position's prediction must pick out: ``"tokens"`` (the
            target subset's final-normed token outputs, above) or ``"pixels"``: the patch's own
            pixels, standardised over its image (so exposure and contrast drop out), through a
            linear head on the predictor (``pixel_head``; the targets are data, no gradient).
            Token outputs carry their position embedding, so the queried position can find
            its token without any content (the term falls near 0 with image negatives);
            pixels carry no position, so only predicting what lies there from the other
            subset solves it: a contrastive, per-image form of MAE's pixel target.
        intra_negatives: ``"image"``: a prediction's negatives are the other drawn positions
            of its image; ``"batch"``: the drawn tokens of every image, so the other images'
            tokens at the same position are negatives too (position alone, which the queries
            carry, no longer finds the target; with ``"image"`` it can).
        crop_scale: ``(lo, hi)``: one random resized crop per image (area fraction
            ``U(lo, hi)``, aspect ratio in [3/4, 4/3], no flip;
            :func:`~spcl_fast.views.sample_crops`) resampled back to the image size
            before partitioning, so both subsets come from the same crop (OCL). Drawn with the
            plan (``plan.crop``). ``None``: off.
        predictor_hidden: width of a small MLP predictor (``Linear -> LayerNorm -> GELU ->
            Linear``) on one branch: the first subset of each pair is predicted, the second is
            the target (0: no predictor). MoCo v3 / BYOL's predictor head, without their
            momentum encoder or stop-gradient: both branches stay the same encoder and both get
            gradients.
        subset_jitter: strength of an independent random intensity change (contrast,
            brightness, curvature, noise) applied to each subset's pixels while training, so
            the subsets of an image cannot be paired by acquisition statistics (0: off).
        subset_warp: strength of an independent small random affine warp (shift, scale,
            rotation) of each subset's pixels while training, so the subsets cannot be paired
            by where the anatomy sits in the frame (0: off).
        background_std: skip background patches: a patch whose pixel standard deviation is
            below ``background_std`` times its image's is in neither subset (flat padding,
            collimation, burned-in blocks). Relative to the image, so any per-image or
            dataset-wide standardisation of the input gives the same mask. Plans then depend
            on the pixels (:meth:`sample_plan` takes ``images``), which costs one small
            device-to-host copy of the ``(B, N)`` mask per step on a GPU. 0: off.
        negatives, symmetric: InfoNCE variant (see :func:`spcl_fast.info_nce`).
        layout: ``"packed"`` or ``"inplace"`` residual-stream layout of the encoder.
        same_patient: what another film of the same patient in the batch is to a film's
            subsets: ``"negative"`` (as any other image), ``"exclude"``: no candidate of the
            InfoNCE at all (:func:`spcl_fast.info_nce`'s ``groups``; ``groups`` of
            :func:`~spcl_fast.methods.losses.bounded_info_nce` for the bounded similarity), or
            ``"positive"``: every subset of it is a positive too
            (:func:`~spcl_fast.methods.losses.multi_positive_nce`, SupCon's mean
            log-probability over the positives; the ``(M, M)`` logits are materialised).
            Both need each image's patient id, ``forward(..., groups=...)`` (global ids under
            ``gather_distributed``: they are gathered with the embeddings); :attr:`uses_groups`
            tells the trainer.
        pair_across: the negative control of the contrastive term: subset 0 of image ``i`` is
            paired with subsets ``1..K-1`` of image ``i - 1`` of the batch (cyclically; the
            batch as the loss sees it, all micro-batches joined), so no "positive" shares an
            image and the term can teach nothing about one. With the within-image terms off,
            a probe of such an encoder should land where the initialisation does.
        recon_weight: weight of the reconstruction term (SplitMask's, El-Nouby et al., 2021;
            0: off), logged as ``recon``: each subset's final-normed token outputs, through a
            :class:`~spcl_fast.nn.decoder.PixelDecoder` (``recon_depth`` blocks of width
            ``recon_dim``, ``recon_heads`` heads) over [those tokens + mask tokens at the
            positions of the image's other subsets], predict the other subsets' patches,
            standardised per patch (:func:`~spcl_fast.nn.decoder.normalized_patches` of what
            the encoder saw: MAE's normalised-pixel target); the term is the mean squared error
            over every predicted patch of the batch. Each image's decoder sequences are its
            kept tokens (varlen attention), one sequence per subset as the context.
        recon_dim, recon_depth, recon_heads: the reconstruction decoder's width, blocks and
            heads.

    ``forward(images, generator=None)`` returns a dict with ``loss`` (scalar, differentiable)
    and detached numbers worth logging, on the first pair of subsets (A, B): ``acc`` (how often
    subset A, predicted when there is a predictor, finds its own subset B among the batch),
    ``pos_sim`` and ``neg_sim`` (mean cosine of positive and negative pairs); with VICReg terms
    also ``contrastive``, ``vicreg_var`` and ``vicreg_cov``, with the intra-image term
    ``contrastive`` and ``intra``, with the reconstruction term ``contrastive`` and ``recon``
    (each unweighted).

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> model = SPCL(vit_tiny_patch16(img_size=64, patch_size=8, depth=2),
        ...              SPCLConfig(keep=0.5, intra_weight=1.0))
        >>> out = model(torch.rand(4, 1, 64, 64))
        >>> out["loss"].backward()
    """

    label = "S-PCL"  # in logs and plots
    Config = SPCLConfig  # its settings, the ``spcl`` section of the training config

    def __init__(self, encoder: VisionTransformer, config: SPCLConfig | None = None,
                 context: BuildContext | None = None):
        super().__init__()
        config = SPCLConfig() if config is None else config
        context = BuildContext() if context is None else context
        config.check(encoder.num_patches)
        if config.similarity == "bounded" and context.gather_distributed:
            raise ValueError("similarity='bounded' takes one process's batch (no global-batch "
                             "loss: gather_distributed=False)")
        pos = encoder.pos_embed  # (on the meta device, as for FLOP counts: no values)
        if config.intra_weight > 0 and not pos.is_meta and not pos.detach().any():
            raise ValueError("intra_weight > 0 queries positions through the encoder's position "
                             "embeddings, which are all zero (pos_embed='none')")
        self.config, self.encoder = config, encoder
        self.gather_distributed = context.gather_distributed
        c, width = config, encoder.embed_dim
        self.projector = (Projector(width, c.proj_hidden, c.proj_dim, c.proj_depth)
                          if c.projector == "mlp" else nn.Identity())
        self.out_dim = c.proj_dim if c.projector == "mlp" else width
        # the intra-image term: a token predictor (and a pixel head for pixel targets); built
        # before the predictor, so a seed gives the weights (and checkpoints the parameter
        # order) of earlier versions
        intra, patch = c.intra_weight > 0, encoder.patch_embed
        self.token_predictor = TokenPredictor(width, encoder.num_heads) if intra else None
        self.pixel_head = (nn.Linear(width, patch.proj.in_channels * patch.patch_size ** 2)
                           if intra and c.intra_target == "pixels" else None)
        self.predictor = (Projector(self.out_dim, c.predictor_hidden, self.out_dim, depth=1)
                          if c.predictor_hidden else None)
        self.recon_decoder = (
            PixelDecoder(width, c.recon_dim, c.recon_depth, c.recon_heads, patch.grid_size,
                         patch.proj.in_channels * patch.patch_size ** 2)
            if c.recon_weight > 0 else None)

    @property
    def uses_groups(self) -> bool:
        """Whether the loss needs each image's patient id (``same_patient`` other than
        ``"negative"``): the trainer passes ``forward(..., groups=...)`` then."""
        return self.config.same_patient != "negative"

    @classmethod
    def from_config(cls, encoder: VisionTransformer, settings, context: BuildContext) -> SPCL:
        """From the ``spcl`` config section (a dict of :class:`SPCLConfig` fields); the loss
        spans every process's batch where the run says so."""
        return cls(encoder, SPCLConfig(**settings), context)

    def sample_plan(
        self, batch_size: int, generator: torch.Generator | None, device,
        images: torch.Tensor | None = None,
    ) -> PartitionPlan:
        """The step's partitions (and, with ``crop_scale``, each image's crop, drawn first).
        With ``background_std`` the flat patches of ``images`` (the batch, cropped) are left
        out; without ``images`` (a FLOP estimate before any batch is read) every patch
        counts, an upper bound of the step's cost."""
        crop = None
        if self.config.crop_scale is not None:
            crop = sample_crops(batch_size, num_global=1, num_local=0,
                                global_scale=self.config.crop_scale, jitter=0.0,
                                generator=generator, device=device).theta[0]  # (B, 2, 3)
        valid = None
        if self.config.background_std > 0 and images is not None:
            # the plan is drawn on the host
            valid = self.foreground(self.crop_images(images, crop)).cpu()
        plan = sample_partitions(
            batch_size,
            self.encoder.num_patches,
            ratio=self.config.ratio,
            ratio_range=self.config.ratio_range,
            keep=self.config.keep,
            valid_mask=valid,
            generator=generator,
            device=device,
            block_size=self.config.block_size,
            shared=self.config.shared_split,
            num_subsets=self.config.num_subsets,
            partition=self.config.partition,
            target_blocks=self.config.target_blocks,
            target_scale=self.config.target_scale,
        )
        return plan if crop is None else dataclasses.replace(plan, crop=crop)

    @staticmethod
    def crop_images(images: torch.Tensor, crop: torch.Tensor | None) -> torch.Tensor:
        """``images (B, C, S, S)`` with each image's crop ``crop[b]`` (``(B, 2, 3)``, a plan's
        ``crop``) resampled back to ``S x S``; ``images`` themselves when ``crop`` is None."""
        if crop is None:
            return images
        crop = crop.to(images.device)[None]  # one crop per image: (1, B, 2, 3)
        gain = torch.ones(crop.shape[:2], device=images.device)  # no intensity change
        return resized_crops(images, crop, gain, torch.zeros_like(gain), images.shape[-1])

    @torch.no_grad()
    def foreground(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` bool: patches whose pixel std is at least ``background_std`` times the
        image's. An image with fewer such patches than subsets (a blank frame) keeps all of its
        patches, so none of its subsets is empty."""
        p = self.encoder.patch_embed.patch_size
        b, c = images.shape[:2]
        patches = images.float().unfold(2, p, p).unfold(3, p, p)  # (B, C, gh, gw, p, p)
        # per channel, then averaged: a flat patch of any one colour is background
        patch_std = patches.reshape(b, c, -1, p * p).std(dim=3).mean(dim=1)  # (B, N)
        image_std = images.float().reshape(b, c, -1).std(dim=2).mean(dim=1, keepdim=True)
        valid = patch_std >= self.config.background_std * image_std
        return valid | (valid.sum(dim=1, keepdim=True) < self.config.num_subsets)

    def train_flops(self, plan: PartitionPlan) -> int:
        """Algorithmic FLOPs of one training step on ``plan`` (forward + backward)."""
        parts = self.encoder.forward_flops(plan.seqlens.tolist(), plan.num_images)
        linears = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
        parts["projector"] = sum(
            flops.linear_flops(plan.num_segments, m.in_features, m.out_features) for m in linears
        )
        m, d = plan.num_images, self.out_dim
        pairs = self.config.num_subsets * (self.config.num_subsets - 1) // 2
        if self.predictor is not None:  # once per query subset: all but the last
            rows = plan.num_images * (self.config.num_subsets - 1)
            parts["predictor"] = sum(
                flops.linear_flops(rows, x.in_features, x.out_features)
                for x in self.predictor.modules() if isinstance(x, nn.Linear)
            )
        queries = m if self.config.negatives == "cross" else 2 * m
        parts["loss"] = pairs * flops.info_nce_flops(queries, queries, d)
        if self.config.vicreg_cov > 0:  # one (d, M) @ (M, d) covariance per subset
            parts["vicreg"] = self.config.num_subsets * flops.linear_flops(d, m, d)
        if self.token_predictor is not None:
            parts.update(self._intra_flops(plan))
        if self.recon_decoder is not None:
            parts = flops.add_parts(parts, *self._recon_flops(plan))
        return flops.training_flops(parts)

    def _recon_flops(self, plan: PartitionPlan) -> tuple[dict[str, int], dict[str, int]]:
        """Forward FLOPs of the reconstruction decoder: its blocks on ``K`` sequences per image
        of its kept tokens (parts ``linear`` and ``attention``), and ``recon_heads``: ``embed``
        on every token once and ``pred`` on the ``K - 1`` predicted copies of each token (the
        loss is elementwise)."""
        dec, k = self.recon_decoder, self.config.num_subsets
        lengths = plan.seqlens.view(-1, k).sum(dim=1).repeat_interleave(k).tolist()
        blk = dec.blocks[0]
        blocks = flops.transformer_blocks_flops(
            lengths, embed_dim=dec.pred.in_features, depth=len(dec.blocks),
            num_heads=blk.attn.num_heads, mlp_hidden=blk.mlp.fc1.out_features)
        heads = (flops.linear_flops(plan.total_tokens, *dec.embed.weight.shape[::-1])
                 + flops.linear_flops((k - 1) * plan.total_tokens, *dec.pred.weight.shape[::-1]))
        return blocks, {"recon_heads": heads}

    def _intra_flops(self, plan: PartitionPlan) -> dict[str, int]:
        """Forward FLOPs of the intra-image term on the real (unpadded) queries and context
        rows: ``kv`` on every token once, then per direction and image ``n_q = min(q, |target
        subset|)`` queries through ``q``, plain-matmul cross-attention over the ``|context|``
        rows, ``proj`` and the MLP (and ``pixel_head``), and an ``n_q x n_q`` logit matrix
        per image (with ``intra_negatives="batch"`` one of all the direction's queries), over
        the target's width. All are matmuls (3x in training)."""
        p, d = self.token_predictor, self.encoder.embed_dim
        hidden = p.mlp.fc1.out_features
        head = self.pixel_head
        target_dim = d if head is None else head.out_features
        predictor = flops.linear_flops(plan.total_tokens, d, 2 * d)
        loss = 0
        drawn = [0, 0]  # real queries of each direction over the batch
        for context, target in plan.seqlens.view(-1, 2).tolist():
            for k, (n_ctx, n_tgt) in enumerate(((context, target), (target, context))):
                n_q = min(self.config.intra_queries, n_tgt)
                predictor += (flops.linear_flops(n_q, d, 2 * d + hidden) + 4 * n_q * n_ctx * d
                              + flops.linear_flops(n_q, hidden, d))  # q + proj + fc1, attn, fc2
                if head is not None:
                    predictor += flops.linear_flops(n_q, d, target_dim)
                loss += flops.info_nce_flops(n_q, n_q, target_dim)
                drawn[k] += n_q
        if self.config.intra_negatives == "batch":
            loss = sum(flops.info_nce_flops(n, n, target_dim) for n in drawn)
        return {"intra_predictor": predictor, "intra_loss": loss}

    def _jitter_subsets(self, images, plan, generator) -> torch.Tensor:
        """A composite image whose patches of each subset come from that subset's own
        independently warped and intensity-jittered copy of the image (patch embedding is per
        patch, so this equals transforming each subset's tokens on their own)."""
        b = images.shape[0]
        s, w = self.config.subset_jitter, self.config.subset_warp
        views = []
        for _ in range(self.config.num_subsets):
            u = torch.rand(8, b, 1, 1, 1, generator=generator).to(images.device) * 2 - 1
            x = images
            if w > 0:
                angle, scale = 0.1 * w * u[4, :, 0, 0, 0], torch.exp(0.1 * w * u[5, :, 0, 0, 0])
                cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
                theta = torch.stack(
                    [
                        torch.stack([cos, -sin, 0.1 * w * u[6, :, 0, 0, 0]], -1),
                        torch.stack([sin, cos, 0.1 * w * u[7, :, 0, 0, 0]], -1),
                    ],
                    1,
                )
                grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
                x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
            if s > 0:
                contrast, brightness = torch.exp(0.4 * s * u[0]), 0.4 * s * u[1]
                curve, noise = 0.2 * s * u[2], 0.1 * s * (u[3] + 1) * torch.randn_like(x)
                x = contrast * x + brightness + curve * (x.square() - 1) + noise
            views.append(x)
        # subset of each patch (patches in no subset take view 0: the encoder never sees them)
        which = torch.zeros(b * plan.num_tokens, dtype=torch.long, device=images.device)
        which[plan.token_index] = plan.segment_ids() % self.config.num_subsets
        grid = self.encoder.patch_embed.grid_size
        patch = self.encoder.patch_embed.patch_size
        which = which.view(b, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        return torch.stack(views).gather(0, which.expand_as(images)[None])[0]

    def _pair_stats(self, z_a: torch.Tensor, z_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Retrieval accuracy of A -> B and mean positive/negative cosines, over the keys of
        every process when the loss gathers them."""
        a = F.normalize(z_a, dim=-1)
        b = F.normalize(z_b, dim=-1)
        offset = 0
        if self.gather_distributed:
            offset = collectives.rank() * b.shape[0]
            b = collectives.all_gather(b)
        sim = a @ b.T
        target = torch.arange(a.shape[0], device=sim.device) + offset
        pos = sim.gather(1, target[:, None]).squeeze(1)
        pairs = max(sim.numel() - pos.numel(), 1)
        return {
            "acc": (sim.argmax(dim=1) == target).float().mean(),
            "pos_sim": pos.mean(),
            "neg_sim": (sim.sum() - pos.sum()) / pairs,
        }

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        plan: PartitionPlan | None = None,
        embed_only: bool = False,
        groups: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and logged numbers (the class docstring): :meth:`batch_loss` of
        :meth:`embed`; ``embed_only``: :meth:`embed`'s output itself (what the trainer's exact
        gradient accumulation caches, :class:`~spcl_fast.methods.base.BatchLoss`).
        ``groups``: ``(B,)`` integer patient ids of the images (on their device), needed when
        :attr:`uses_groups`, else unused."""
        if plan is None:
            plan = self.sample_plan(images.shape[0], generator, images.device, images)
        embedded = self.embed(images, plan, generator, groups)
        return embedded if embed_only else self.batch_loss(embedded)

    def embed(self, images: torch.Tensor, plan: PartitionPlan,
              generator: torch.Generator | None = None,
              groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything of a step that has parameters, image by image (dim 0 runs over the
        images, so the outputs of micro-batches join with ``torch.cat``), at least fp32:
        ``z (B, K, d)``, each subset's projected embedding; with a predictor ``queries
        (B, K-1, d)``, its output on subsets ``0..K-2``; with the intra-image term, per
        direction (A to B, B to A) the predictions ``intra_pred (B, 2, q, d')`` of the drawn
        positions, their targets ``intra_target`` and which are real ``intra_valid (B, 2, q)``
        (``q = min(intra_queries, longest subset)``; a smaller subset pads with ``False``);
        with the reconstruction term each image's summed squared error ``recon_sse (B,)``
        over its predicted patches and their number ``recon_count (B,)`` (int64); when
        :attr:`uses_groups`, the patient ids ``groups (B,)`` (int64) as given."""
        if self.uses_groups:
            groups = self._check_groups(groups, images)
        images = self.crop_images(images, plan.crop)
        if (self.config.subset_jitter > 0 or self.config.subset_warp > 0) and self.training:
            images = self._jitter_subsets(images, plan, generator)
        if plan.subsets_per_image != self.config.num_subsets:
            raise ValueError(f"plan has {plan.subsets_per_image} subsets per image, the model "
                             f"{self.config.num_subsets}")
        tokens, layout = None, self.config.layout
        if self.token_predictor is None and self.recon_decoder is None:
            pooled = self.encoder.forward_partitioned(images, plan, layout)  # (KB, D)
        else:  # the token outputs too, (T, D) in packed order
            pooled, tokens = self.encoder.forward_partitioned_tokens(images, plan, layout)
        # at least fp32 into the loss: it is tiny next to the encoder and keeps the logged loss
        # exact under bf16 autocast.
        z = self.projector(pooled).view(images.shape[0], self.config.num_subsets, -1)
        dtype = torch.promote_types(z.dtype, torch.float32)
        out = {"z": z.to(dtype)}
        if self.predictor is not None:  # subsets 0..K-2 query the pairs (i, j > i)
            out["queries"] = self.predictor(out["z"][:, :-1]).to(dtype)
        if self.token_predictor is not None:
            out.update(self._intra_predictions(tokens, plan, generator, dtype, images))
        if self.recon_decoder is not None:
            out.update(self._recon_errors(tokens, plan, images))
        if self.uses_groups:
            out["groups"] = groups
        return out

    def _check_groups(self, groups: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
        """``groups`` as ``(B,)`` int64 on the images' device, or a ``ValueError`` naming what
        is wrong (none given: the dataset has no patient ids)."""
        flag = f"--same-patient {self.config.same_patient}"
        if groups is None:
            raise ValueError(f"{flag} needs each image's patient id, and none came with the "
                             "batch (a dataset without patient ids, such as the synthetic "
                             "set); use --same-patient negative there")
        if (not isinstance(groups, torch.Tensor) or groups.shape != images.shape[:1]
                or groups.is_floating_point() or groups.is_complex()):
            raise ValueError(f"{flag}: groups must be a ({images.shape[0]},) integer tensor, "
                             f"one patient id per image, got "
                             f"{getattr(groups, 'shape', type(groups).__name__)}")
        return groups.to(images.device, torch.int64)

    def _recon_errors(self, tokens: torch.Tensor, plan: PartitionPlan,
                      images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction term's per-image sums (:meth:`embed`). For image ``b`` and each
        of its subsets ``k`` one decoder sequence holds the image's kept tokens in packed
        order: subset ``k``'s as context (``embed`` of its token outputs), the others' as the
        mask token, each plus its position embedding; the others' rows are predicted."""
        dec, k = self.recon_decoder, self.config.num_subsets
        b, n, total = plan.num_images, plan.num_tokens, plan.total_tokens
        device = tokens.device
        image_cu = plan.cu_seqlens.long()[::k]  # (B+1,): each image's rows in packed order
        lengths = (image_cu[1:] - image_cu[:-1]).repeat_interleave(k)  # (KB,) sequences
        cu = F.pad(lengths.cumsum(0), (1, 0))
        seq = torch.repeat_interleave(torch.arange(b * k, device=device), lengths,
                                      output_size=k * total)
        packed = image_cu[seq // k] + torch.arange(k * total, device=device) - cu[seq]
        context = plan.segment_ids()[packed] % k == seq % k
        patch = plan.token_index[packed]  # b * N + position
        x = torch.where(context[:, None], dec.embed(tokens)[packed], dec.mask_token)
        x = x + dec.pos_embed[patch % n].to(x.dtype)
        # the (K-1) T predicted rows, in order, without a host sync (a bool mask would sync)
        target = context.to(torch.int8).argsort(stable=True)[:(k - 1) * total]
        pred = dec(x, cu.int(), min(n, k * plan.max_seqlen), target)
        pixels = normalized_patches(images.detach(), self.encoder.patch_embed.patch_size)
        error = (pred.float() - pixels.flatten(0, 1)[patch[target]]).square().mean(dim=-1)
        image = seq[target] // k
        return {"recon_sse": error.new_zeros(b).index_add(0, image, error),
                "recon_count": image.new_zeros(b).index_add(0, image, torch.ones_like(image))}

    def batch_loss(self, embedded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss and logged numbers of :meth:`forward` from :meth:`embed`'s output, of one
        batch or of several micro-batches joined along dim 0 (no parameters act here)."""
        z, groups = embedded["z"], embedded.get("groups")
        if self.uses_groups and groups is None:
            raise ValueError(f"--same-patient {self.config.same_patient}: batch_loss needs "
                             "the embedding's 'groups' (the images' patient ids)")
        queries = embedded["queries"] if "queries" in embedded else z[:, :-1]
        if self.config.pair_across:  # every subset after the first from the previous image
            if z.shape[0] < 2:
                raise ValueError("pair_across needs at least 2 images in the batch")
            z = torch.cat([z[:, :1], z[:, 1:].roll(1, dims=0)], dim=1)
        losses, stats = [], None
        for i, j in itertools.combinations(range(self.config.num_subsets), 2):
            losses.append(self._contrastive(queries[:, i], z[:, j], groups))
            if stats is None:  # logged for the first pair (A, B)
                with torch.no_grad():
                    stats = self._pair_stats(queries[:, i], z[:, j])
        loss = torch.stack(losses).mean()
        terms = {}  # name: (weight, unweighted value)
        if self.config.vicreg_var > 0 or self.config.vicreg_cov > 0:
            subsets = z.unbind(1)
            terms["vicreg_var"] = (self.config.vicreg_var,
                                   torch.stack([vicreg_variance(s) for s in subsets]).mean())
            terms["vicreg_cov"] = (self.config.vicreg_cov,
                                   torch.stack([vicreg_covariance(s) for s in subsets]).mean())
        if "intra_pred" in embedded:
            terms["intra"] = (self.config.intra_weight, self._intra_loss(embedded))
        if "recon_sse" in embedded:
            terms["recon"] = (self.config.recon_weight, embedded["recon_sse"].sum()
                              / embedded["recon_count"].sum().clamp(min=1))
        if not terms:
            return {"loss": loss, **stats}
        total = loss
        for weight, value in terms.values():
            total = total + weight * value
        return {"loss": total, **stats, "contrastive": loss.detach(),
                **{name: value.detach() for name, (_, value) in terms.items()}}

    def _intra_predictions(self, tokens: torch.Tensor, plan: PartitionPlan, generator, dtype,
                           images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The intra-image term's predictions and targets (:meth:`embed`): A predicting B's
        drawn tokens and B predicting A's (``tokens``: the ``(T, D)`` packed token outputs of a
        two-subset plan; ``images``: what the encoder saw, the targets of
        ``intra_target="pixels"``). The positions are drawn as one row of ``2 N`` numbers per
        image, so a batch cut into micro-batches draws what the whole batch would."""
        b, n, length = plan.num_images, plan.num_tokens, plan.max_seqlen
        seg = plan.segment_ids()
        col = torch.arange(plan.total_tokens, device=seg.device) - plan.cu_seqlens.long()[seg]
        kv = self.token_predictor.kv(tokens)  # once per token, before padding
        # (B, 2, L, ...): each segment's rows padded to the longest one
        padded_kv = kv.new_zeros(plan.num_segments, length, kv.shape[1])
        padded_kv[seg, col] = kv
        padded = tokens.new_zeros(plan.num_segments, length, tokens.shape[1])
        padded[seg, col] = tokens
        valid = torch.zeros(plan.num_segments, length, dtype=torch.bool, device=seg.device)
        valid[seg, col] = True
        position = torch.zeros_like(valid, dtype=torch.long)
        position[seg, col] = plan.token_index % n
        padded_kv, padded, valid, position = (
            t.view(b, 2, length, *t.shape[2:]) for t in (padded_kv, padded, valid, position))
        q = min(self.config.intra_queries, length)
        pixels = self.pixel_targets(images) if self.pixel_head is not None else None
        priority = torch.rand(b, 2, n, generator=generator).to(seg.device)
        preds, targets, picks = [], [], []
        for ctx, tgt in ((0, 1), (1, 0)):
            # q random positions of the target subset (fewer real ones where it is smaller)
            pick = priority[:, tgt, :length].masked_fill(~valid[:, tgt], 2.0)
            pick = pick.argsort(dim=1, stable=True)[:, :q]
            where = position[:, tgt].gather(1, pick)  # (B, q) patch indices
            pred = self.token_predictor(self.encoder.pos_embed[0][where], padded_kv[:, ctx],
                                        valid[:, ctx])
            if pixels is None:
                target = padded[:, tgt].gather(1, pick[..., None].expand(-1, -1, tokens.shape[1]))
            else:
                pred = self.pixel_head(pred)
                target = pixels.gather(1, where[..., None].expand(-1, -1, pixels.shape[-1]))
            preds.append(pred.to(dtype))
            targets.append(target.to(dtype))
            picks.append(valid[:, tgt].gather(1, pick))
        return {"intra_pred": torch.stack(preds, 1), "intra_target": torch.stack(targets, 1),
                "intra_valid": torch.stack(picks, 1)}

    def _intra_loss(self, embedded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The intra-image term: the mean over both directions of
        :func:`~spcl_fast.methods.losses.intra_image_nce`, each prediction against the drawn
        positions of its image (``intra_negatives="batch"``: of every image)."""
        losses = []
        for k in range(2):
            pred, target, valid = (embedded[key][:, k] for key in
                                   ("intra_pred", "intra_target", "intra_valid"))
            if self.config.intra_negatives == "batch":  # one "image" of every drawn token
                pred, target, valid = (t.reshape(1, -1, *t.shape[2:])
                                       for t in (pred, target, valid))
            with torch.autocast(pred.device.type, enabled=False):  # logits in fp32 (at least)
                losses.append(intra_image_nce(pred, target, self.config.intra_temperature, valid))
        return 0.5 * (losses[0] + losses[1])

    def pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, p^2 C)`` float: each image's patches (:func:`~spcl_fast.views.patchify`),
        its pixels standardised over the whole image first (the targets of
        ``intra_target="pixels"``)."""
        x = images.detach().float().flatten(1)
        x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + 1e-6)
        return patchify(x.view(images.shape), self.encoder.patch_embed.patch_size)

    def _contrastive(self, queries: torch.Tensor, keys: torch.Tensor,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE of one pair of subsets (``groups``: the patient ids, used as
        ``same_patient`` says)."""
        c = self.config
        bounded = c.similarity == "bounded"
        if c.same_patient == "positive":
            return multi_positive_nce(queries, keys, groups, c.temperature, c.symmetric,
                                      c.negatives, c.kappa if bounded else None,
                                      self.gather_distributed)
        groups = groups if c.same_patient == "exclude" else None
        if bounded:
            return bounded_info_nce(queries, keys, c.temperature, c.kappa, c.symmetric, groups)
        return info_nce(queries, keys, c.temperature, c.symmetric, c.negatives,
                        gather_distributed=self.gather_distributed, groups=groups)
