"""Input intensity normalisation. S-PCL uses no augmentation, so this is the whole pipeline."""

from __future__ import annotations

import torch

NORMALIZE_MODES = ("dataset", "image", "equalize", "none")


def normalize_images(
    x: torch.Tensor, mode: str, mean: float = 0.5, std: float = 0.25
) -> torch.Tensor:
    """Normalise ``(B, C, S, S)`` images in ``[0, 1]``.

    ``"dataset"``: ``(x - mean) / std`` with dataset-wide constants; ``"image"``: each image to
    zero mean and unit variance (removes exposure and contrast, cues shared by both subsets of
    an image); ``"equalize"``: per-image histogram equalisation (each pixel replaced by its
    intensity rank, scaled to zero mean and unit variance), which undoes any monotone change of
    window, exposure or gamma; ``"none"``: unchanged.
    """
    if mode == "dataset":
        return (x - mean) / std
    if mode == "image":
        flat = x.flatten(1)
        mu = flat.mean(1).view(-1, *([1] * (x.dim() - 1)))
        sigma = flat.std(1).clamp(min=1e-6).view(-1, *([1] * (x.dim() - 1)))
        return (x - mu) / sigma
    if mode == "equalize":
        flat = x.flatten(1)
        ranks = flat.argsort(dim=1).argsort(dim=1).to(x.dtype)
        n = flat.shape[1]
        uniform = (ranks + 0.5) / n  # in (0, 1), mean 1/2, variance (1 - 1/n^2) / 12
        return ((uniform - 0.5) * (12**0.5)).view_as(x)
    if mode == "none":
        return x
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
