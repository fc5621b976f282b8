"""Input intensity normalisation. S-PCL uses no augmentation, so this is the whole pipeline."""

from __future__ import annotations

import torch

NORMALIZE_MODES = ("dataset", "image", "none")


def normalize_images(
    x: torch.Tensor, mode: str, mean: float = 0.5, std: float = 0.25
) -> torch.Tensor:
    """Normalise ``(B, C, S, S)`` images in ``[0, 1]``.

    ``"dataset"``: ``(x - mean) / std`` with dataset-wide constants; ``"image"``: each image to
    zero mean and unit variance (removes exposure and contrast, cues shared by both subsets of
    an image); ``"none"``: unchanged.
    """
    if mode == "dataset":
        return (x - mean) / std
    if mode == "image":
        flat = x.flatten(1)
        mu = flat.mean(1).view(-1, *([1] * (x.dim() - 1)))
        sigma = flat.std(1).clamp(min=1e-6).view(-1, *([1] * (x.dim() - 1)))
        return (x - mu) / sigma
    if mode == "none":
        return x
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
