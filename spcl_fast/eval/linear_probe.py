"""Linear probing: a frozen encoder's features, a multi-label logistic regression on top.

The regularisation strength is chosen on a validation split by mean AUROC, as in the CXR
literature's linear-evaluation protocol; the chosen probe is then scored on the test split.
Features are extracted once per split (:func:`extract_features` for an image tensor,
:func:`extract_dataset_features` for any dataset of the data contract) and every L2 strength
is fitted on the same features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
    """``encoder(images)`` in batches (``(n, 1, S, S) -> (n, D)`` on CPU, fp32).

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
        >>> extract_features(enc, torch.rand(5, 1, 32, 32), batch_size=2).shape
        torch.Size([5, 192])
    """
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


def data_loader(dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a dataset of the data contract (items are dicts; ids collate to lists)
    with a seeded shuffle order."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        drop_last=drop_last, generator=torch.Generator().manual_seed(seed) if shuffle else None,
        persistent_workers=False,
    )


@torch.no_grad()
def extract_dataset_features(
    encoder: nn.Module,
    dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every item of ``dataset`` and its labels, once, with a progress bar.

    Returns ``(features (n, D) fp32 CPU, labels (n, C) fp32)``; labels come from
    ``dataset.labels`` (NaN = unknown), so nothing is decoded twice.

    Example::

        >>> from spcl_fast.data import SyntheticCXR
        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
        >>> x, y = extract_dataset_features(enc, SyntheticCXR("val", num_images=6, image_size=32))
        >>> x.shape, y.shape
        (torch.Size([6, 192]), torch.Size([6, 5]))
    """
    was_training = encoder.training
    encoder.eval()
    feats = []
    loader = data_loader(dataset, batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        x = batch["image"].to(device, non_blocking=True)
        if transform is not None:
            x = transform(x)
        feats.append(encoder(x).float().cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.as_tensor(dataset.labels, dtype=torch.float32)


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
    return_scores: bool = False,
) -> dict:
    """Fit on ``train`` features/labels for each L2 strength, pick the best on ``val`` by mean
    AUROC, report per-class and mean AUROC on ``test``.

    Each split is ``(features (n, D), labels (n, C))``; NaN labels are skipped in the loss and
    the metrics. Features are standardised with the training split's statistics first (what
    the BatchNorm without affine before MAE's and OCL's linear probes computes at eval). The
    result holds ``mean_auroc``, ``per_class_auroc`` (test), ``val_mean_auroc``,
    ``val_per_class_auroc``, ``l2`` (chosen), ``l2_grid_val`` (val mean AUROC per strength) and,
    with ``return_scores``, ``test_scores`` (``(n, C)`` logits, a tensor).

    Args:
        train, val, test: ``(features (n, D) float32, labels (n, C) float32 of 0/1/NaN)``.
        l2_grid: L2 strengths tried on the training split.
        steps: L-BFGS iterations per fit.
        class_names: ``C`` names keying the per-class results (default ``"0"``, ``"1"``, ...).
        return_scores: also return the test logits.

    Returns:
        a dict of floats (AUROCs, ``l2``), ``{name: float}`` dicts and, optionally, a tensor.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> def split(n):  # D = 4 features; label c is the sign of feature c (C = 2)
        ...     x = torch.randn(n, 4, generator=g)
        ...     return x, (x[:, :2] > 0).float()
        >>> res = linear_probe(split(64), split(32), split(32), l2_grid=(1e-3, 1e-1), steps=20,
        ...                    class_names=["a", "b"], return_scores=True)
        >>> res["l2"] in (1e-3, 1e-1), res["mean_auroc"] > 0.9, list(res["per_class_auroc"])
        (True, True, ['a', 'b'])
        >>> res["test_scores"].shape
        torch.Size([32, 2])
    """
    mean = train[0].mean(0)
    std = train[0].std(0).clamp(min=1e-6)

    def norm(x):
        return (x - mean) / std

    best = None
    grid_scores = {}
    for l2 in l2_grid:
        w, b = fit_logistic(norm(train[0]), train[1], l2, steps)
        val_per_class, val_auc = multilabel_auroc(norm(val[0]) @ w + b, val[1])
        grid_scores[l2] = val_auc
        if best is None or (not math.isnan(val_auc) and (math.isnan(best[0]) or val_auc > best[0])):
            best = (val_auc, l2, w, b, val_per_class)
    val_auc, l2, w, b, val_per_class = best
    scores = norm(test[0]) @ w + b
    per_class, mean_auc = multilabel_auroc(scores, test[1])
    names = list(class_names) if class_names else [str(c) for c in range(len(per_class))]
    result = {
        "mean_auroc": mean_auc,
        "per_class_auroc": dict(zip(names, per_class, strict=True)),
        "val_mean_auroc": val_auc,
        "val_per_class_auroc": dict(zip(names, val_per_class, strict=True)),
        "l2": l2,
        "l2_grid_val": grid_scores,
    }
    if return_scores:
        result["test_scores"] = scores
    return result
