"""S-PCL: semantic-partitioned contrastive learning.

The patch tokens of each image are split at random into two disjoint subsets (or more); the
same encoder embeds each subset on its own (varlen attention inside the subset), a projector
maps the pooled embeddings, and InfoNCE pulls the subsets of an image together and pushes other
images' apart. No augmentations, no decoder, no momentum encoder.

OCL's recipe (Yang et al., ICML 2025: few kept tokens, the final-normed class token straight
into a bounded-similarity loss) is ``keep=0.1`` (its mask ratio 0.9), ``class_token=True,
projector="none", similarity="bounded", temperature=0.07``; few tokens per image need more kept
(the recipe study's ``spcl_ocl`` keeps 0.2).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, flops
from ..nn.vit import VisionTransformer
from ..ops import info_nce
from ..partition import PartitionPlan, sample_partitions
from .base import BuildContext
from .losses import bounded_info_nce, vicreg_covariance, vicreg_variance


class Projector(nn.Module):
    """``Linear -> LayerNorm -> GELU -> Linear`` head (``depth`` hidden layers)."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(depth):
            layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SPCL(nn.Module):
    """Encoder + projector + InfoNCE over the subsets of each image (two by default).

    Args:
        encoder: a :class:`~spcl_fast.nn.VisionTransformer`.
        proj_hidden, proj_dim, proj_depth: projector width, output size and hidden layers.
        projector: ``"mlp"`` (the :class:`Projector` above) or ``"none"``: the pooled,
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
    also ``contrastive``, ``vicreg_var`` and ``vicreg_cov`` (each unweighted).

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

    @classmethod
    def from_config(cls, encoder: VisionTransformer, settings, context: BuildContext) -> SPCL:
        """From the ``spcl`` config section; the loss spans every process's batch where the run
        says so."""
        return cls(encoder, **settings, gather_distributed=context.gather_distributed)

    def sample_plan(
        self, batch_size: int, generator: torch.Generator | None, device,
        images: torch.Tensor | None = None,
    ) -> PartitionPlan:
        """The step's partitions. With ``background_std`` the flat patches of ``images`` (the
        batch) are left out; without ``images`` (a FLOP estimate before any batch is read)
        every patch counts, an upper bound of the step's cost."""
        valid = None
        if self.background_std > 0 and images is not None:
            valid = self.foreground(images).cpu()  # the plan is drawn on the host
        return sample_partitions(
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
        )

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
        return flops.training_flops(parts)

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
    ) -> dict[str, torch.Tensor]:
        if plan is None:
            plan = self.sample_plan(images.shape[0], generator, images.device, images)
        if (self.subset_jitter > 0 or self.subset_warp > 0) and self.training:
            images = self._jitter_subsets(images, plan, generator)
        if plan.subsets_per_image != self.num_subsets:
            raise ValueError(f"plan has {plan.subsets_per_image} subsets per image, the model "
                             f"{self.num_subsets}")
        pooled = self.encoder.forward_partitioned(images, plan, self.layout)  # (KB, D)
        # at least fp32 into the loss: it is tiny next to the encoder and keeps the logged loss
        # exact under bf16 autocast.
        z = self.projector(pooled).view(images.shape[0], self.num_subsets, -1)
        dtype = torch.promote_types(z.dtype, torch.float32)
        z = z.to(dtype)
        # subsets 0..K-2 are the queries of the pairs (i, j > i); the last is only a target
        queries = z[:, :-1] if self.predictor is None else self.predictor(z[:, :-1]).to(dtype)
        losses, stats = [], None
        for i, j in itertools.combinations(range(self.num_subsets), 2):
            losses.append(self._contrastive(queries[:, i], z[:, j]))
            if stats is None:  # logged for the first pair (A, B)
                with torch.no_grad():
                    stats = self._pair_stats(queries[:, i], z[:, j])
        loss = torch.stack(losses).mean()
        if self.vicreg_var == 0 and self.vicreg_cov == 0:
            return {"loss": loss, **stats}
        subsets = z.unbind(1)
        var = torch.stack([vicreg_variance(s) for s in subsets]).mean()
        cov = torch.stack([vicreg_covariance(s) for s in subsets]).mean()
        total = loss + self.vicreg_var * var + self.vicreg_cov * cov
        return {"loss": total, **stats, "contrastive": loss.detach(), "vicreg_var": var.detach(),
                "vicreg_cov": cov.detach()}

    def _contrastive(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.similarity == "bounded":
            return bounded_info_nce(queries, keys, self.temperature, self.kappa, self.symmetric)
        return info_nce(queries, keys, self.temperature, self.symmetric, self.negatives,
                        gather_distributed=self.gather_distributed)
