"""S-PCL: semantic-partitioned contrastive learning.

The patch tokens of each image are split at random into two disjoint subsets; the same encoder
embeds each subset on its own (varlen attention inside the subset), a projector maps the pooled
embeddings, and InfoNCE pulls the two subsets of an image together and pushes other images'
apart. No augmentations, no decoder, no momentum encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import flops
from ..nn.vit import VisionTransformer
from ..ops import info_nce
from ..partition import PartitionPlan, sample_partitions


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
    """Encoder + projector + InfoNCE over the two subsets of each image.

    Args:
        encoder: a :class:`~spcl_fast.nn.VisionTransformer`.
        proj_hidden, proj_dim, proj_depth: projector width, output size and hidden layers.
        temperature: InfoNCE temperature.
        ratio, ratio_range, keep, block_size, shared_split: subset sizes and shapes (see
            :func:`spcl_fast.sample_partitions`).
        negatives, symmetric: InfoNCE variant (see :func:`spcl_fast.info_nce`).
        layout: ``"packed"`` or ``"inplace"`` residual-stream layout of the encoder.

    ``forward(images, generator=None)`` returns a dict with ``loss`` (scalar, differentiable)
    and detached numbers worth logging: ``acc`` (how often subset A finds its own subset B
    among the batch), ``pos_sim`` and ``neg_sim`` (mean cosine of positive and negative pairs).

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> model = SPCL(vit_tiny_patch16(img_size=64, patch_size=8, depth=2))
        >>> out = model(torch.rand(4, 1, 64, 64))
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        proj_depth: int = 1,
        temperature: float = 0.1,
        ratio: float = 0.5,
        ratio_range: tuple[float, float] | None = None,
        keep: float = 1.0,
        block_size: int = 1,
        shared_split: bool = False,
        negatives: str = "cross",
        symmetric: bool = True,
        layout: str = "packed",
    ):
        super().__init__()
        self.encoder = encoder
        self.projector = Projector(encoder.embed_dim, proj_hidden, proj_dim, proj_depth)
        self.temperature = temperature
        self.ratio, self.ratio_range, self.keep = ratio, ratio_range, keep
        self.block_size, self.shared_split = block_size, shared_split
        self.negatives, self.symmetric = negatives, symmetric
        self.layout = layout

    def sample_plan(self, batch_size: int, generator: torch.Generator | None, device) -> PartitionPlan:
        return sample_partitions(
            batch_size, self.encoder.num_patches, ratio=self.ratio, ratio_range=self.ratio_range,
            keep=self.keep, generator=generator, device=device, block_size=self.block_size,
            shared=self.shared_split,
        )

    def train_flops(self, plan: PartitionPlan) -> int:
        """Algorithmic FLOPs of one training step on ``plan`` (forward + backward)."""
        enc = self.encoder
        parts = flops.vit_forward_flops(
            num_images=plan.num_images, num_patches=enc.num_patches,
            seqlens=plan.seqlens.tolist(), embed_dim=enc.embed_dim, depth=enc.depth,
            num_heads=enc.num_heads, mlp_hidden=enc.blocks[0].mlp.fc1.out_features,
            patch_size=enc.patch_embed.patch_size,
            in_chans=enc.patch_embed.proj.in_channels,
        )
        linears = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
        parts["projector"] = sum(
            flops.linear_flops(plan.num_segments, m.in_features, m.out_features) for m in linears
        )
        m, d = plan.num_images, linears[-1].out_features
        queries = m if self.negatives == "cross" else 2 * m
        parts["loss"] = flops.info_nce_flops(queries, queries, d)
        return flops.training_flops(parts)

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        plan: PartitionPlan | None = None,
    ) -> dict[str, torch.Tensor]:
        if plan is None:
            plan = self.sample_plan(images.shape[0], generator, images.device)
        pooled = self.encoder.forward_partitioned(images, plan, self.layout)  # (2B, D)
        z = self.projector(pooled).view(images.shape[0], 2, -1)
        z_a, z_b = z[:, 0], z[:, 1]
        loss = info_nce(z_a, z_b, self.temperature, self.symmetric, self.negatives)
        with torch.no_grad():
            a = nn.functional.normalize(z_a.float(), dim=-1)
            b = nn.functional.normalize(z_b.float(), dim=-1)
            sim = a @ b.T
            target = torch.arange(sim.shape[0], device=sim.device)
            pos = sim.diagonal()
            m = sim.shape[0]
            neg = (sim.sum() - pos.sum()) / max(m * (m - 1), 1)
            stats = {
                "acc": (sim.argmax(dim=1) == target).float().mean(),
                "pos_sim": pos.mean(),
                "neg_sim": neg,
            }
        return {"loss": loss, **stats}
