"""Metrics as the CXR literature reports them: per-class AUROC and its mean."""

from __future__ import annotations

import math

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of one class (Mann-Whitney U with tied ranks averaged).

    ``scores`` and ``labels`` are 1-D; labels are 0/1 and NaN entries (unknown labels) are
    skipped. Returns NaN when only one class is present.
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
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
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
