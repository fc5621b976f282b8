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

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, flops
from ..nn.heads import Projector
from ..nn.vit import Mlp, VisionTransformer
from ..ops import info_nce
from ..partition import PartitionPlan, sample_partitions
from ..views import patchify, resized_crops, sample_crops
from .base import BuildContext
from .losses import bounded_info_nce, intra_image_nce, vicreg_covariance, vicreg_variance


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


class SPCL(nn.Module):
    """Encoder + projector + InfoNCE over the subsets of each image (two by default).

    Args:
        encoder: a :class:`~spcl_fast.nn.VisionTransformer`.
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
        gather_distributed: inside ``torch.distributed``, every process's embeddings are the
            negatives (the loss sees the global batch); the logged numbers too.
        layout: ``"packed"`` or ``"inplace"`` residual-stream layout of the encoder.

    ``forward(images, generator=None)`` returns a dict with ``loss`` (scalar, differentiable)
    and detached numbers worth logging, on the first pair of subsets (A, B): ``acc`` (how often
    subset A, predicted when there is a predictor, finds its own subset B among the batch),
    ``pos_sim`` and ``neg_sim`` (mean cosine of positive and negative pairs); with VICReg terms
    also ``contrastive``, ``vicreg_var`` and ``vicreg_cov``, with the intra-image term
    ``contrastive`` and ``intra`` (each unweighted).

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> model = SPCL(vit_tiny_patch16(img_size=64, patch_size=8, depth=2))
        >>> out = model(torch.rand(4, 1, 64, 64))
        >>> out["loss"].backward()
    """

    label = "S-PCL"  # in logs and plots

    def __init__(
        self,
        encoder: VisionTransformer,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        proj_depth: int = 1,
        projector: str = "mlp",
        temperature: float = 0.1,
        similarity: str = "cosine",
        kappa: float = 1 / 64,
        vicreg_var: float = 0.0,
        vicreg_cov: float = 0.0,
        ratio: float = 0.5,
        ratio_range: tuple[float, float] | None = None,
        keep: float = 1.0,
        block_size: int = 1,
        shared_split: bool = False,
        num_subsets: int = 2,
        partition: str = "random",
        target_blocks: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        intra_weight: float = 0.0,
        intra_queries: int = 16,
        intra_temperature: float = 0.1,
        intra_negatives: str = "image",
        intra_target: str = "tokens",
        crop_scale: tuple[float, float] | None = None,
        predictor_hidden: int = 0,
        subset_jitter: float = 0.0,
        subset_warp: float = 0.0,
        background_std: float = 0.0,
        negatives: str = "cross",
        symmetric: bool = True,
        gather_distributed: bool = False,
        layout: str = "packed",
    ):
        super().__init__()
        self.encoder = encoder
        if projector not in ("mlp", "none"):
            raise ValueError(f"projector must be 'mlp' or 'none', got {projector!r}")
        self.projector = (Projector(encoder.embed_dim, proj_hidden, proj_dim, proj_depth)
                          if projector == "mlp" else nn.Identity())
        self.out_dim = proj_dim if projector == "mlp" else encoder.embed_dim
        self.temperature = temperature
        if similarity not in ("cosine", "bounded"):
            raise ValueError(f"similarity must be 'cosine' or 'bounded', got {similarity!r}")
        if similarity == "bounded" and (negatives != "cross" or gather_distributed):
            raise ValueError("similarity='bounded' takes one process's batch with cross "
                             "negatives (negatives='cross', no global-batch loss)")
        if kappa < 0 or vicreg_var < 0 or vicreg_cov < 0:
            raise ValueError(f"kappa, vicreg_var and vicreg_cov must be >= 0, got {kappa}, "
                             f"{vicreg_var}, {vicreg_cov}")
        self.similarity, self.kappa = similarity, kappa
        self.vicreg_var, self.vicreg_cov = vicreg_var, vicreg_cov
        self.ratio, self.ratio_range, self.keep = ratio, ratio_range, keep
        self.block_size, self.shared_split = block_size, shared_split
        if num_subsets < 2:
            raise ValueError(f"num_subsets must be >= 2, got {num_subsets}")
        if num_subsets > 2 and (ratio != 0.5 or ratio_range is not None):
            raise ValueError(f"ratio and ratio_range size subset A against B; with "
                             f"num_subsets={num_subsets} the subsets are of equal size")
        self.num_subsets = num_subsets
        if partition not in ("random", "anatomy"):
            raise ValueError(f"partition must be 'random' or 'anatomy', got {partition!r}")
        self.partition, self.target_blocks = partition, target_blocks
        self.target_scale = tuple(target_scale)
        self._init_intra(intra_weight, intra_queries, intra_temperature, intra_negatives,
                         intra_target)
        if crop_scale is not None and not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be None or (lo, hi) with 0 < lo <= hi <= 1, got "
                             f"{crop_scale}")
        self.crop_scale = None if crop_scale is None else tuple(crop_scale)
        if predictor_hidden < 0:
            raise ValueError(f"predictor_hidden must be >= 0 (0: none), got {predictor_hidden}")
        self.predictor = (Projector(self.out_dim, predictor_hidden, self.out_dim, depth=1)
                          if predictor_hidden else None)
        self.subset_jitter, self.subset_warp = subset_jitter, subset_warp
        if background_std < 0:
            raise ValueError(f"background_std must be >= 0, got {background_std}")
        self.background_std = background_std
        self.negatives, self.symmetric = negatives, symmetric
        self.gather_distributed = gather_distributed
        self.layout = layout

    def _init_intra(self, weight: float, queries: int, temperature: float,
                    negatives: str, target: str) -> None:
        """The intra-image term's settings and, when it is on, its :class:`TokenPredictor`."""
        if not (weight >= 0 and queries >= 1 and temperature > 0):
            raise ValueError(f"intra_weight must be >= 0, intra_queries >= 1 and "
                             f"intra_temperature > 0, got {weight}, {queries}, {temperature}")
        if negatives not in ("image", "batch"):
            raise ValueError(f"intra_negatives must be 'image' or 'batch', got {negatives!r}")
        if target not in ("tokens", "pixels"):
            raise ValueError(f"intra_target must be 'tokens' or 'pixels', got {target!r}")
        self.intra_negatives, self.intra_target = negatives, target
        if weight > 0 and self.num_subsets != 2:
            raise ValueError(f"intra_weight > 0 predicts subset B from A and back: it needs "
                             f"num_subsets=2, got {self.num_subsets}")
        pos = self.encoder.pos_embed  # (on the meta device, as for FLOP counts: no values)
        if weight > 0 and not pos.is_meta and not pos.detach().any():
            raise ValueError("intra_weight > 0 queries positions through the encoder's position "
                             "embeddings, which are all zero (pos_embed='none')")
        self.intra_weight, self.intra_queries = weight, queries
        self.intra_temperature = temperature
        self.token_predictor = (TokenPredictor(self.encoder.embed_dim, self.encoder.num_heads)
                                if weight > 0 else None)
        patch = self.encoder.patch_embed
        self.pixel_head = (nn.Linear(self.encoder.embed_dim,
                                     patch.proj.in_channels * patch.patch_size ** 2)
                           if weight > 0 and target == "pixels" else None)

    @classmethod
    def from_config(cls, encoder: VisionTransformer, settings, context: BuildContext) -> SPCL:
        """From the ``spcl`` config section; the loss spans every process's batch where the run
        says so."""
        return cls(encoder, **settings, gather_distributed=context.gather_distributed)

    def sample_plan(
        self, batch_size: int, generator: torch.Generator | None, device,
        images: torch.Tensor | None = None,
    ) -> PartitionPlan:
        """The step's partitions (and, with ``crop_scale``, each image's crop, drawn first).
        With ``background_std`` the flat patches of ``images`` (the batch, cropped) are left
        out; without ``images`` (a FLOP estimate before any batch is read) every patch
        counts, an upper bound of the step's cost."""
        crop = None
        if self.crop_scale is not None:
            crop = sample_crops(batch_size, num_global=1, num_local=0,
                                global_scale=self.crop_scale, jitter=0.0, generator=generator,
                                device=device).theta[0]  # (B, 2, 3)
        valid = None
        if self.background_std > 0 and images is not None:
            # the plan is drawn on the host
            valid = self.foreground(self.crop_images(images, crop)).cpu()
        plan = sample_partitions(
            batch_size,
            self.encoder.num_patches,
            ratio=self.ratio,
            ratio_range=self.ratio_range,
            keep=self.keep,
            valid_mask=valid,
            generator=generator,
            device=device,
            block_size=self.block_size,
            shared=self.shared_split,
            num_subsets=self.num_subsets,
            partition=self.partition,
            target_blocks=self.target_blocks,
            target_scale=self.target_scale,
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
        valid = patch_std >= self.background_std * image_std
        return valid | (valid.sum(dim=1, keepdim=True) < self.num_subsets)

    def train_flops(self, plan: PartitionPlan) -> int:
        """Algorithmic FLOPs of one training step on ``plan`` (forward + backward)."""
        parts = self.encoder.forward_flops(plan.seqlens.tolist(), plan.num_images)
        linears = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
        parts["projector"] = sum(
            flops.linear_flops(plan.num_segments, m.in_features, m.out_features) for m in linears
        )
        m, d = plan.num_images, self.out_dim
        pairs = self.num_subsets * (self.num_subsets - 1) // 2
        if self.predictor is not None:  # once per query subset: all but the last
            rows = plan.num_images * (self.num_subsets - 1)
            parts["predictor"] = sum(
                flops.linear_flops(rows, x.in_features, x.out_features)
                for x in self.predictor.modules() if isinstance(x, nn.Linear)
            )
        queries = m if self.negatives == "cross" else 2 * m
        parts["loss"] = pairs * flops.info_nce_flops(queries, queries, d)
        if self.vicreg_cov > 0:  # one (d, M) @ (M, d) covariance per subset
            parts["vicreg"] = self.num_subsets * flops.linear_flops(d, m, d)
        if self.token_predictor is not None:
            parts.update(self._intra_flops(plan))
        return flops.training_flops(parts)

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
                n_q = min(self.intra_queries, n_tgt)
                predictor += (flops.linear_flops(n_q, d, 2 * d + hidden) + 4 * n_q * n_ctx * d
                              + flops.linear_flops(n_q, hidden, d))  # q + proj + fc1, attn, fc2
                if head is not None:
                    predictor += flops.linear_flops(n_q, d, target_dim)
                loss += flops.info_nce_flops(n_q, n_q, target_dim)
                drawn[k] += n_q
        if self.intra_negatives == "batch":
            loss = sum(flops.info_nce_flops(n, n, target_dim) for n in drawn)
        return {"intra_predictor": predictor, "intra_loss": loss}

    def _jitter_subsets(self, images, plan, generator) -> torch.Tensor:
        """A composite image whose patches of each subset come from that subset's own
        independently warped and intensity-jittered copy of the image (patch embedding is per
        patch, so this equals transforming each subset's tokens on their own)."""
        b = images.shape[0]
        s, w = self.subset_jitter, self.subset_warp
        views = []
        for _ in range(self.num_subsets):
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
        which[plan.token_index] = plan.segment_ids() % self.num_subsets
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
            offset = distributed.rank() * b.shape[0]
            b = distributed.all_gather(b)
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
    ) -> dict[str, torch.Tensor]:
        """The loss and logged numbers (the class docstring): :meth:`batch_loss` of
        :meth:`embed`; ``embed_only``: :meth:`embed`'s output itself (what the trainer's exact
        gradient accumulation caches, :class:`~spcl_fast.methods.base.BatchLoss`)."""
        if plan is None:
            plan = self.sample_plan(images.shape[0], generator, images.device, images)
        embedded = self.embed(images, plan, generator)
        return embedded if embed_only else self.batch_loss(embedded)

    def embed(self, images: torch.Tensor, plan: PartitionPlan,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Everything of a step that has parameters, image by image (dim 0 runs over the
        images, so the outputs of micro-batches join with ``torch.cat``), at least fp32:
        ``z (B, K, d)``, each subset's projected embedding; with a predictor ``queries
        (B, K-1, d)``, its output on subsets ``0..K-2``; with the intra-image term, per
        direction (A to B, B to A) the predictions ``intra_pred (B, 2, q, d')`` of the drawn
        positions, their targets ``intra_target`` and which are real ``intra_valid (B, 2, q)``
        (``q = min(intra_queries, longest subset)``; a smaller subset pads with ``False``)."""
        images = self.crop_images(images, plan.crop)
        if (self.subset_jitter > 0 or self.subset_warp > 0) and self.training:
            images = self._jitter_subsets(images, plan, generator)
        if plan.subsets_per_image != self.num_subsets:
            raise ValueError(f"plan has {plan.subsets_per_image} subsets per image, the model "
                             f"{self.num_subsets}")
        tokens = None
        if self.token_predictor is None:
            pooled = self.encoder.forward_partitioned(images, plan, self.layout)  # (KB, D)
        else:  # the token outputs too, (T, D) in packed order
            pooled, tokens = self.encoder.forward_partitioned_tokens(images, plan, self.layout)
        # at least fp32 into the loss: it is tiny next to the encoder and keeps the logged loss
        # exact under bf16 autocast.
        z = self.projector(pooled).view(images.shape[0], self.num_subsets, -1)
        dtype = torch.promote_types(z.dtype, torch.float32)
        out = {"z": z.to(dtype)}
        if self.predictor is not None:  # subsets 0..K-2 query the pairs (i, j > i)
            out["queries"] = self.predictor(out["z"][:, :-1]).to(dtype)
        if tokens is not None:
            out.update(self._intra_predictions(tokens, plan, generator, dtype, images))
        return out

    def batch_loss(self, embedded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss and logged numbers of :meth:`forward` from :meth:`embed`'s output, of one
        batch or of several micro-batches joined along dim 0 (no parameters act here)."""
        z = embedded["z"]
        queries = embedded["queries"] if "queries" in embedded else z[:, :-1]
        losses, stats = [], None
        for i, j in itertools.combinations(range(self.num_subsets), 2):
            losses.append(self._contrastive(queries[:, i], z[:, j]))
            if stats is None:  # logged for the first pair (A, B)
                with torch.no_grad():
                    stats = self._pair_stats(queries[:, i], z[:, j])
        loss = torch.stack(losses).mean()
        terms = {}  # name: (weight, unweighted value)
        if self.vicreg_var > 0 or self.vicreg_cov > 0:
            subsets = z.unbind(1)
            terms["vicreg_var"] = (self.vicreg_var,
                                   torch.stack([vicreg_variance(s) for s in subsets]).mean())
            terms["vicreg_cov"] = (self.vicreg_cov,
                                   torch.stack([vicreg_covariance(s) for s in subsets]).mean())
        if "intra_pred" in embedded:
            terms["intra"] = (self.intra_weight, self._intra_loss(embedded))
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
        q = min(self.intra_queries, length)
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
            if self.intra_negatives == "batch":  # one "image" of every drawn token
                pred, target, valid = (t.reshape(1, -1, *t.shape[2:])
                                       for t in (pred, target, valid))
            with torch.autocast(pred.device.type, enabled=False):  # logits in fp32 (at least)
                losses.append(intra_image_nce(pred, target, self.intra_temperature, valid))
        return 0.5 * (losses[0] + losses[1])

    def pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, p^2 C)`` float: each image's patches (:func:`~spcl_fast.views.patchify`),
        its pixels standardised over the whole image first (the targets of
        ``intra_target="pixels"``)."""
        x = images.detach().float().flatten(1)
        x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + 1e-6)
        return patchify(x.view(images.shape), self.encoder.patch_embed.patch_size)

    def _contrastive(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.similarity == "bounded":
            return bounded_info_nce(queries, keys, self.temperature, self.kappa, self.symmetric)
        return info_nce(queries, keys, self.temperature, self.symmetric, self.negatives,
                        gather_distributed=self.gather_distributed)
