"""Metrics as the CXR literature reports them: per-class AUROC and its mean for classification,
Dice per image for segmentation (SIIM-ACR pneumothorax convention for empty masks), and a paired
bootstrap over test images for how sure a difference of mean AUROCs is."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def bootstrap_mean_auroc(scores: Sequence[torch.Tensor], labels: torch.Tensor,
                         counts: torch.Tensor) -> torch.Tensor:
    """Mean AUROC of each ``(n, C)`` score matrix on each resample of the ``n`` test images.

    A resample is a row of ``counts`` (``(B, n)``: how often each image is drawn), so the AUROC
    of a resample is the Mann-Whitney statistic with every image weighted by its count: the
    same number as :func:`auroc` on the drawn images, in one pass over sorted scores instead of
    ``B`` sorts. Every matrix shares ``labels`` (NaN: skipped) and the resamples, which is what
    makes differences of the results paired. A class without drawn positives or negatives is
    left out of that resample's mean, for every matrix alike (NaN where no class is left).
    Returns float64 ``(len(scores), B)``.
    """
    if counts.dim() != 2 or labels.dim() != 2 or counts.shape[1] != labels.shape[0]:
        raise ValueError(f"counts must be (B, n) for labels (n, C); got {tuple(counts.shape)} "
                         f"and {tuple(labels.shape)}")
    labels = labels.detach().double()
    counts = counts.double()
    known = ~torch.isnan(labels)
    out = torch.zeros(len(scores), counts.shape[0], dtype=torch.float64)
    defined = torch.zeros(counts.shape[0], dtype=torch.float64)
    for c in range(labels.shape[1]):
        rows = known[:, c]
        y, w = labels[rows, c], counts[:, rows]
        pos, neg = (w * y).sum(1), (w * (1 - y)).sum(1)
        ok = (pos > 0) & (neg > 0)
        defined += ok
        for k, s in enumerate(scores):
            s = s.detach().double()[rows, c]
            _, group = torch.unique(s, sorted=True, return_inverse=True)  # ties share a group
            n_groups = int(group.max()) + 1 if group.numel() else 0
            idx = group.expand_as(w)
            pos_w = torch.zeros(w.shape[0], n_groups, dtype=torch.float64).scatter_add_(
                1, idx, w * y)
            neg_w = torch.zeros_like(pos_w).scatter_add_(1, idx, w * (1 - y))
            below = neg_w.cumsum(1) - neg_w  # negatives scored strictly lower
            u = (pos_w * (below + 0.5 * neg_w)).sum(1)
            out[k] += torch.where(ok, u / (pos * neg).clamp(min=1e-300), 0.0)
    return torch.where(defined > 0, out / defined.clamp(min=1), math.nan)


def paired_bootstrap(scores_a: torch.Tensor | Sequence[torch.Tensor],
                     scores_b: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
                     resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """How sure is "A's mean AUROC is above B's" on this test set? A paired bootstrap over the
    test images (both scored on the same resamples).

    ``scores_a`` / ``scores_b`` are ``(n, C)`` scores of the same ``n`` images, or lists of
    them (one per training seed): a list counts as the average of its matrices' mean AUROCs,
    so seed noise and test-sample noise both enter the interval. Returns ``difference`` (A - B
    on the full test set), ``low`` / ``high`` (the ``level`` percentile interval of the
    resampled differences), ``p_not_above`` (the fraction of resamples where A is not above
    B) and ``resamples``.

    Example::

        >>> y = torch.tensor([[0.0], [0.0], [1.0], [1.0]] * 8)
        >>> good, noise = y + 0.1 * torch.arange(32.0)[:, None] % 0.3, torch.rand(32, 1)
        >>> res = paired_bootstrap(good, noise, y, resamples=200)
        >>> res["difference"] > 0.3, res["low"] > 0.1, res["p_not_above"]
        (True, True, 0.0)
    """
    a = [scores_a] if isinstance(scores_a, torch.Tensor) else list(scores_a)
    b = [scores_b] if isinstance(scores_b, torch.Tensor) else list(scores_b)
    n = labels.shape[0]
    if labels.dim() != 2 or any(s.shape != labels.shape for s in a + b):
        raise ValueError(f"every score matrix must have the labels' shape {tuple(labels.shape)} "
                         f"(n, C); got {[tuple(s.shape) for s in a + b]}")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    known = ~torch.isnan(labels)
    if not ((labels == 1) & known).any(0).logical_and(((labels == 0) & known).any(0)).any():
        raise ValueError("no class has both positive and negative labels: no AUROC to compare")
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (resamples, n), generator=g)
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n, dtype=torch.float64))
    full = torch.ones(1, n, dtype=torch.float64)
    every = bootstrap_mean_auroc(a + b, labels, torch.cat([full, counts]))
    diff = every[: len(a)].mean(0) - every[len(a):].mean(0)
    tail, drawn = (1 - level) / 2, diff[1:][~diff[1:].isnan()]
    low, high = torch.quantile(drawn, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return {"difference": diff[0].item(), "low": low.item(), "high": high.item(),
            "p_not_above": (drawn <= 0).double().mean().item(), "resamples": resamples}


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
