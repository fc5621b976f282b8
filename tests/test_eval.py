"""Evaluation: AUROC, ROC curves and Dice against scikit-learn, and a linear probe that finds a
planted signal."""

import math

import pytest
import torch

from spcl_fast.eval import (
    auroc,
    dice_per_image,
    dice_summary,
    linear_probe,
    multilabel_auroc,
    roc_curve,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(seed, ties):
    g = torch.Generator().manual_seed(seed)
    n = 200
    labels = (torch.rand(n, generator=g) < 0.3).float()
    scores = torch.randn(n, generator=g) + labels
    if ties:
        scores = scores.round()
    expected = sklearn_metrics.roc_auc_score(labels.numpy(), scores.numpy())
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_skips_unknown_labels_and_single_class():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
    labels = torch.tensor([0.0, 1.0, float("nan"), 0.0])
    assert auroc(scores, labels) == 1.0
    assert math.isnan(auroc(scores, torch.zeros(4)))
    per_class, mean = multilabel_auroc(
        torch.stack([scores, scores], 1),
        torch.stack([torch.tensor([0.0, 1, 1, 0]), torch.zeros(4)], 1),
    )
    assert math.isnan(per_class[1]) and mean == per_class[0]


def test_linear_probe_recovers_planted_signal():
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randn(n, 16, generator=g)
        y = torch.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0.5)], 1).float()
        return x, y

    result = linear_probe(split(400), split(200), split(200), steps=100, class_names=["a", "b"])
    assert result["mean_auroc"] > 0.97
    assert set(result["per_class_auroc"]) == {"a", "b"}
    noise = linear_probe(*(tuple(torch.randn(200, 16, generator=g) if i == 0 else
                                 (torch.rand(200, 2, generator=g) < 0.5).float() for i in range(2))
                           for _ in range(3)), steps=50)
    assert abs(noise["mean_auroc"] - 0.5) < 0.12


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(150, generator=g) < 0.4).float()
    scores = (torch.randn(150, generator=g) + labels).round(decimals=1)  # with ties
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels.numpy(), scores.numpy(),
                                            drop_intermediate=False)
    ours = roc_curve(scores, labels)
    assert ours[0].tolist() == pytest.approx(fpr.tolist())
    assert ours[1].tolist() == pytest.approx(tpr.tolist())
    assert roc_curve(scores, torch.zeros(150))[0].numel() == 0


@pytest.mark.parametrize("seed", range(3))
def test_dice_matches_f1_on_flattened_masks(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(12, 1, 16, 16, generator=g) < torch.rand(12, 1, 1, 1, generator=g) * 0.3
    pred = target ^ (torch.rand(12, 1, 16, 16, generator=g) < 0.1)
    target[:3] = False  # empty ground truths
    pred[:2] = False  # two of them predicted empty (score 1), one not (score 0)
    ours = dice_per_image(pred, target)
    for i in range(12):
        # F1 of binary masks is Dice; zero_division=1 scores empty-vs-empty as 1 (Kaggle SIIM).
        expected = sklearn_metrics.f1_score(target[i].flatten().numpy(), pred[i].flatten().numpy(),
                                            zero_division=1.0)
        assert ours[i].item() == pytest.approx(expected, abs=1e-12)
    assert ours[:2].tolist() == [1.0, 1.0] and ours[2].item() == 0.0
    summary = dice_summary(ours, target.flatten(1).any(1))
    assert summary["num_positive"] == 9 and summary["dice_empty"] == pytest.approx(2 / 3)
    assert summary["dice"] == pytest.approx(ours.mean().item())
    assert summary["dice_positive"] == pytest.approx(ours[3:].mean().item())
