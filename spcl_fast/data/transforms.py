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

    Args:
        x: ``(B, C, S, S)`` float images in ``[0, 1]`` (any ``(B, ...)`` shape works: per-image
            statistics are over all non-batch dimensions).
        mode: one of :data:`NORMALIZE_MODES`.
        mean, std: the dataset constants of ``"dataset"`` mode.

    Returns:
        ``x``'s shape and dtype (``x`` itself for ``"none"``).

    Example::

        >>> x = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 2, 2)
        >>> normalize_images(x, "dataset").flatten().tolist()  # (x - 0.5) / 0.25
        [-2.0, -1.0, 0.0, 2.0]
        >>> y = normalize_images(x, "image")
        >>> abs(y.mean().item()) < 1e-6, round(y.std().item(), 4)  # per image
        (True, 1.0)
        >>> normalize_images(x, "equalize").flatten().mul(1000).round().tolist()  # ranks only
        [-1299.0, -433.0, 433.0, 1299.0]
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
