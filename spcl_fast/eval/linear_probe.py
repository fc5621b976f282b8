"""Linear probing: a frozen encoder's features, a multi-label logistic regression on top.

The regularisation strength is chosen on a validation split by mean AUROC, as in the CXR
literature's linear-evaluation protocol; the chosen probe is then scored on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import multilabel_auroc

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``encoder(images)`` in batches (``(n, 1, S, S) -> (n, D)`` on CPU, fp32)."""
    was_training = encoder.training
    encoder.eval()
    feats = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        if transform is not None:
            x = transform(x)
        feats.append(encoder(x).float().cpu())
    encoder.train(was_training)
    return torch.cat(feats)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label logistic regression by full-batch L-BFGS; NaN labels are ignored.

    Returns ``(weight (D, C), bias (C,))``.
    """
    known = ~torch.isnan(y)
    targets = torch.nan_to_num(y)
    weight = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    bias = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ weight + bias
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        loss = (loss * known).sum() / known.sum().clamp(min=1) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    l2_grid: Sequence[float] = L2_GRID,
    steps: int = 300,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Fit on ``train`` features/labels for each L2 strength, pick the best on ``val`` by mean
    AUROC, report per-class and mean AUROC on ``test``.

    Features are standardised with the training split's statistics first.
    """
    mean = train[0].mean(0)
    std = train[0].std(0).clamp(min=1e-6)

    def norm(x):
        return (x - mean) / std

    best = None
    for l2 in l2_grid:
        w, b = fit_logistic(norm(train[0]), train[1], l2, steps)
        _, val_auc = multilabel_auroc(norm(val[0]) @ w + b, val[1])
        if best is None or (not math.isnan(val_auc) and val_auc > best[0]):
            best = (val_auc, l2, w, b)
    val_auc, l2, w, b = best
    per_class, mean_auc = multilabel_auroc(norm(test[0]) @ w + b, test[1])
    names = class_names or [str(c) for c in range(len(per_class))]
    return {
        "mean_auroc": mean_auc,
        "per_class_auroc": dict(zip(names, per_class)),
        "val_mean_auroc": val_auc,
        "l2": l2,
    }
