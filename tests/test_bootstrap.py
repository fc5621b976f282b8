"""The paired bootstrap of mean AUROC differences: each weighted resample against the plain
AUROC of the images it draws, ties and unknown labels included, and the interval's behaviour on
planted differences."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spcl_fast.eval import bootstrap_mean_auroc, multilabel_auroc, paired_bootstrap


def _case(seed, n, c, ties, unknown):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, c, generator=g) < 0.3).double()
    if unknown:
        labels[torch.rand(n, c, generator=g) < 0.2] = math.nan
    scores = [torch.randn(n, c, generator=g) + 0.5 * torch.nan_to_num(labels)
              for _ in range(2)]
    if ties:
        scores = [s.round() for s in scores]
    return g, labels, scores


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), c=st.integers(1, 4),
       ties=st.booleans(), unknown=st.booleans())
def test_each_resample_is_the_auroc_of_the_images_it_draws(seed, n, c, ties, unknown):
    g, labels, scores = _case(seed, n, c, ties, unknown)
    draws = torch.randint(n, (6, n), generator=g)
    counts = torch.zeros(6, n).scatter_add_(1, draws, torch.ones(6, n))
    got = bootstrap_mean_auroc(scores, labels, counts)
    for b in range(6):
        for k, s in enumerate(scores):
            _, want = multilabel_auroc(s[draws[b]], labels[draws[b]])
            if math.isnan(want):  # no class has both outcomes in this resample
                assert math.isnan(got[k, b])
            else:
                assert got[k, b].item() == pytest.approx(want, abs=1e-12)


def test_full_sample_difference_and_symmetry():
    _, labels, (a, b) = _case(0, 300, 5, ties=True, unknown=True)
    res = paired_bootstrap(a, b, labels, resamples=300)
    want = multilabel_auroc(a, labels)[1] - multilabel_auroc(b, labels)[1]
    assert res["difference"] == pytest.approx(want, abs=1e-12)
    assert res["low"] <= res["difference"] <= res["high"]
    swapped = paired_bootstrap(b, a, labels, resamples=300)
    assert swapped["difference"] == pytest.approx(-res["difference"], abs=1e-12)
    assert swapped["low"] == pytest.approx(-res["high"], abs=1e-9)
    same = paired_bootstrap(a, a.clone(), labels, resamples=50)
    assert (same["difference"], same["low"], same["high"], same["p_not_above"]) == (0, 0, 0, 1)


def test_planted_gain_is_found_and_noise_is_not():
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(400, 3, generator=g) < 0.3).float()
    signal = labels + torch.randn(400, 3, generator=g)
    weaker = labels + 2 * torch.randn(400, 3, generator=g)
    gain = paired_bootstrap(signal, weaker, labels)
    assert gain["low"] > 0 and gain["p_not_above"] < 0.01
    other = labels + torch.randn(400, 3, generator=g)  # as good, independent noise
    tie = paired_bootstrap(signal, other, labels)
    assert tie["low"] < 0 < tie["high"]


def test_a_list_of_seeds_counts_as_their_average():
    _, labels, (a, b) = _case(3, 200, 4, ties=False, unknown=False)
    c = a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9))
    res = paired_bootstrap([a, c], b, labels, resamples=100)
    means = [multilabel_auroc(s, labels)[1] for s in (a, c, b)]
    assert res["difference"] == pytest.approx((means[0] + means[1]) / 2 - means[2], abs=1e-12)


def test_bad_arguments_are_named():
    labels = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="labels' shape"):
        paired_bootstrap(torch.zeros(10, 3), torch.zeros(10, 2), labels)
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(torch.zeros(10, 2), torch.zeros(10, 2), labels, resamples=0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(torch.zeros(10, 2), torch.zeros(10, 2), labels, level=1.0)
    with pytest.raises(ValueError, match="counts must be"):
        bootstrap_mean_auroc([torch.zeros(10, 2)], labels, torch.ones(3, 9))
    with pytest.raises(ValueError, match="both positive and negative"):
        paired_bootstrap(torch.zeros(10, 2), torch.ones(10, 2), labels)
