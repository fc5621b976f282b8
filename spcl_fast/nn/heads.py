"""Heads on the pooled encoder output: the contrastive methods' MLP :class:`Projector` (S-PCL,
SimCLR, and S-PCL's predictor) and DINO's :class:`DINOHead` (MLP, L2-normalised bottleneck,
weight-normalised prototypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class DINOHead(nn.Module):
    """MLP (``nlayers`` linears, GELU) to an L2-normalised bottleneck, then a weight-normalised
    prototype layer without bias (DINO's ``weight_norm`` with the gain fixed to 1, i.e. every
    prototype row is unit-norm).

    ``forward(x (M, in_dim)) -> (M, out_dim)`` logits (before temperature).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=1).to(x.dtype))
