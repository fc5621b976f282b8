"""Metrics as the CXR literature reports them: per-class AUROC and its mean for classification,
Dice per image for segmentation (SIIM-ACR pneumothorax convention for empty masks)."""

from __future__ import annotations

import math

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of one class (Mann-Whitney U with tied ranks averaged).

    ``scores`` and ``labels`` are 1-D; labels are 0/1 and NaN entries (unknown labels) are
    skipped. Returns NaN when only one class is present.

    Example::

        >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
        0.75
    """
    scores = scores.detach().double().flatten()
    labels = labels.detach().double().flatten()
    known = ~torch.isnan(labels)
    scores, labels = scores[known], labels[known]
    n_pos = int((labels == 1).sum())
    n_neg = int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average the ranks of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    rank_sum = ranks[labels == 1].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def multilabel_auroc(scores: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], float]:
    """Per-class AUROCs of ``(n, C)`` scores and labels, and their mean over defined classes."""
    per_class = [auroc(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    defined = [a for a in per_class if not math.isnan(a)]
    return per_class, (sum(defined) / len(defined) if defined else math.nan)


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ROC curve of one class: ``(fpr, tpr)``, float64, one point per distinct score plus the
    origin, NaN labels skipped. Empty tensors when only one class is present.

    Example::

        >>> fpr, tpr = roc_curve(torch.tensor([0.1, 0.4, 0.35, 0.8]),
        ...                      torch.tensor([0.0, 0.0, 1.0, 1.0]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    scores = scores.detach().double().flatten()
    labels = labels.detach().double().flatten()
    known = ~torch.isnan(labels)
    scores, labels = scores[known], labels[known]
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    order = scores.argsort(descending=True)
    scores, labels = scores[order], labels[order]
    tps, fps = labels.cumsum(0), (1 - labels).cumsum(0)
    # One point per threshold: the last position of each run of tied scores.
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fps[last] / n_neg]), torch.cat([zero, tps[last] / n_pos])


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice ``2|P∩G| / (|P| + |G|)`` of each image's binary masks, float64 ``(B,)``.

    ``pred`` and ``target`` are ``(B, ...)`` masks (bool, or numbers where > 0.5 means
    foreground). An image whose prediction and ground truth are both empty scores 1 (the
    SIIM-ACR Kaggle convention: a correct "no pneumothorax"); an empty ground truth with a
    non-empty prediction, or the reverse, scores 0.

    Example::

        >>> gt = torch.zeros(3, 4, 4); gt[0, :2] = 1
        >>> pr = torch.zeros(3, 4, 4); pr[0, :1] = 1; pr[2, 0, 0] = 1
        >>> dice_per_image(pr, gt).tolist()
        [0.6666666666666666, 1.0, 0.0]
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = (pred > 0.5 if pred.dtype != torch.bool else pred).flatten(1).double()
    g = (target > 0.5 if target.dtype != torch.bool else target).flatten(1).double()
    inter = (p * g).sum(1)
    total = p.sum(1) + g.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def dice_summary(dice: torch.Tensor, positive: torch.Tensor) -> dict:
    """Mean Dice over all images, over images with a non-empty ground truth (``positive``, bool
    ``(B,)``) and over the empty ones (there: the fraction predicted empty), with counts.

    Example::

        >>> dice_summary(torch.tensor([0.5, 1.0, 0.0]), torch.tensor([True, False, False]))
        {'dice': 0.5, 'dice_positive': 0.5, 'dice_empty': 0.5, 'num_images': 3, 'num_positive': 1}
    """
    dice, positive = dice.double(), positive.bool()

    def mean(x):
        return x.mean().item() if x.numel() else math.nan

    return {
        "dice": mean(dice),
        "dice_positive": mean(dice[positive]),
        "dice_empty": mean(dice[~positive]),
        "num_images": int(dice.numel()),
        "num_positive": int(positive.sum()),
    }
