"""How the methods view an image: random resized crops and patches.

* :class:`CropPlan` / :func:`sample_crops` / :func:`resized_crops`: random resized crops with
  an intensity jitter, drawn on the host as a plan (so the training engine seeds, checkpoints
  and resumes them like S-PCL's partitions) and resampled on the device (DINO's multi-crop,
  SimCLR's two crops, S-PCL's shared ``crop_scale`` crop).
* :func:`patchify`: an image as its patches in the patch embedding's order (MAE's and S-PCL's
  pixel targets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropPlan:
    """Geometry and intensity jitter of every crop of a step, crop-major (crop ``v`` of image
    ``b`` is row ``v * B + b`` once flattened); the first ``num_global`` crops are global.

    Attributes:
        theta: ``(V, B, 2, 3)`` float32 affine maps from crop coordinates to image coordinates,
            both in ``[-1, 1]`` (``F.affine_grid``'s convention, ``align_corners=False``).
        gain, bias: ``(V, B)`` float32 intensity jitter, ``crop * gain + bias``.
        num_global: how many of the ``V`` crops are global.
    """

    theta: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor
    num_global: int

    @property
    def num_images(self) -> int:
        return self.theta.shape[1]

    @property
    def num_crops(self) -> int:
        return self.theta.shape[0]

    def to(self, device: torch.device | str) -> CropPlan:
        return CropPlan(*(t.to(device, non_blocking=True) for t in (self.theta, self.gain,
                                                                      self.bias)), self.num_global)

    @classmethod
    def concat(cls, plans: Sequence[CropPlan]) -> CropPlan:
        """Crops of consecutive image ranges as one plan of all their images, in order."""
        return cls(*(torch.cat([getattr(p, k) for p in plans], dim=1)
                     for k in ("theta", "gain", "bias")), plans[0].num_global)


def sample_crops(
    batch_size: int,
    num_global: int = 2,
    num_local: int = 10,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    jitter: float = 0.1,
    flip_prob: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> CropPlan:
    """Random resized crops (area fraction from ``*_scale``, aspect ratio in [3/4, 4/3], sides
    clipped to the image) with intensity gain ``exp(U(-jitter, jitter))`` and offset
    ``U(-jitter, jitter)``; horizontal flips with probability ``flip_prob`` (0: CXR laterality).

    Example::

        >>> plan = sample_crops(4, generator=torch.Generator().manual_seed(0))
        >>> plan.theta.shape, plan.num_global
        (torch.Size([12, 4, 2, 3]), 2)
    """
    v = num_global + num_local
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(7, v, batch_size, generator=generator, device=gen_device)
    lo, hi = torch.tensor([global_scale] * num_global + [local_scale] * num_local,
                          device=gen_device).T[..., None]
    area = lo + (hi - lo) * u[0]
    log_aspect = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1]
    # Half-sizes in [-1, 1] coordinates equal side fractions: a full-image crop has w = h = 1.
    w = (area * log_aspect.exp()).sqrt().clamp(max=1.0)
    h = (area / log_aspect.exp()).sqrt().clamp(max=1.0)
    tx = (1 - w) * (2 * u[2] - 1)
    ty = (1 - h) * (2 * u[3] - 1)
    flip = torch.where(u[6] < flip_prob, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, tx], -1), torch.stack([zero, h, ty], -1)],
                        dim=-2)
    gain = (jitter * (2 * u[4] - 1)).exp()
    bias = jitter * (2 * u[5] - 1)
    return CropPlan(theta, gain, bias, num_global).to(device or gen_device)


def resized_crops(images: torch.Tensor, theta: torch.Tensor, gain: torch.Tensor,
                  bias: torch.Tensor, size: int) -> torch.Tensor:
    """``images (B,C,S,S)`` and ``theta (V,B,2,3)``, ``gain/bias (V,B)`` -> ``(V*B, C, size,
    size)`` crops, crop-major, bilinear (``grid_sample``, borders clamped)."""
    v, b = theta.shape[:2]
    src = images.unsqueeze(0).expand(v, *images.shape).reshape(v * b, *images.shape[1:])
    grid = F.affine_grid(theta.reshape(v * b, 2, 3).to(images.dtype),
                         [v * b, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out * gain.reshape(-1, 1, 1, 1).to(out.dtype) + bias.reshape(-1, 1, 1, 1).to(out.dtype)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, S, S)`` -> ``(B, N, p*p*C)`` in the patch embedding's row-major patch order."""
    b, c, s, _ = images.shape
    g = s // patch_size
    x = images.reshape(b, c, g, patch_size, g, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, patch_size * patch_size * c)
