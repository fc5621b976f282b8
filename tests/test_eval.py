"""Evaluation: AUROC against scikit-learn, and a linear probe that finds a planted signal."""

import math

import pytest
import torch

from spcl_fast.eval import auroc, linear_probe, multilabel_auroc

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
        torch.stack([scores, scores], 1), torch.stack([torch.tensor([0.0, 1, 1, 0]), torch.zeros(4)], 1)
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
