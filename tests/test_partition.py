"""Invariants of sample_partitions over many seeds and shapes."""

import numpy as np
import pytest
import torch

from spcl_fast import PartitionPlan, sample_partitions


def _subsets(plan: PartitionPlan):
    cu = plan.cu_seqlens.tolist()
    idx = plan.token_index.tolist()
    return [idx[cu[s] : cu[s + 1]] for s in range(plan.num_segments)]


def _check_structure(plan, b, n):
    assert plan.token_index.dtype == torch.int64 and plan.cu_seqlens.dtype == torch.int32
    assert plan.cu_seqlens.shape == (2 * b + 1,) and plan.cu_seqlens[0] == 0
    assert plan.cu_seqlens[-1] == plan.token_index.numel()
    assert plan.max_seqlen == int(plan.seqlens.max())
    assert plan.token_index.unique().numel() == plan.token_index.numel()  # no token twice
    subsets = _subsets(plan)
    for img in range(b):
        a, bb = subsets[2 * img], subsets[2 * img + 1]
        rows = a + bb
        assert all(img * n <= r < (img + 1) * n for r in rows), "a segment left its image"
        assert a == sorted(a) and bb == sorted(bb)
        assert not set(a) & set(bb)
    return subsets


@pytest.mark.parametrize("b,n", [(1, 1), (1, 2), (1, 3), (3, 7), (5, 16), (8, 196)])
@pytest.mark.parametrize("seed", range(4))
def test_full_cover_disjoint_nonempty(b, n, seed):
    plan = sample_partitions(b, n, generator=torch.Generator().manual_seed(seed))
    subsets = _check_structure(plan, b, n)
    for img in range(b):
        a, bb = subsets[2 * img], subsets[2 * img + 1]
        assert sorted(a + bb) == list(range(img * n, (img + 1) * n))
        if n >= 2:
            assert a and bb
        assert len(a) == min(max(round(0.5 * n), 1), max(n - 1, 1))


@pytest.mark.parametrize("ratio", [0.01, 0.2, 0.5, 0.9, 0.99])
def test_ratio_sets_sizes(ratio):
    n = 50
    plan = sample_partitions(4, n, ratio=ratio, generator=torch.Generator().manual_seed(1))
    lens = plan.seqlens.view(4, 2)
    expected_a = min(max(round(ratio * n), 1), n - 1)
    assert (lens[:, 0] == expected_a).all() and (lens.sum(1) == n).all()


def test_ratio_range_draws_per_image():
    plan = sample_partitions(
        64, 100, ratio_range=(0.3, 0.7), generator=torch.Generator().manual_seed(0)
    )
    _check_structure(plan, 64, 100)
    frac_a = plan.seqlens.view(64, 2)[:, 0].float() / 100
    assert frac_a.min() >= 0.29 and frac_a.max() <= 0.71
    assert frac_a.std() > 0.05  # not one ratio for all


@pytest.mark.parametrize("keep", [0.01, 0.25, 0.5, 0.999])
def test_keep_leaves_tokens_out(keep):
    b, n = 6, 40
    plan = sample_partitions(b, n, keep=keep, generator=torch.Generator().manual_seed(2))
    subsets = _check_structure(plan, b, n)
    kept = max(round(keep * n), 2)
    for img in range(b):
        a, bb = subsets[2 * img], subsets[2 * img + 1]
        assert len(a) + len(bb) == kept and a and bb


@pytest.mark.parametrize("seed", range(5))
def test_valid_mask_restricts_and_keeps_nonempty(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 7, 30
    valid = torch.rand(b, n, generator=g) < 0.4
    valid[0] = False  # no valid token
    valid[1] = False
    valid[1, 5] = True  # exactly one
    valid[2] = False
    valid[2, [3, 17]] = True  # exactly two
    plan = sample_partitions(b, n, keep=0.6, valid_mask=valid, generator=g)
    subsets = _check_structure(plan, b, n)
    flat_valid = valid.reshape(-1)
    assert flat_valid[plan.token_index].all()
    assert subsets[0] == [] and subsets[1] == []
    assert subsets[2] == [n + 5] and subsets[3] == []
    assert len(subsets[4]) == 1 and len(subsets[5]) == 1
    for img in range(3, b):
        nv = int(valid[img].sum())
        if nv >= 2:
            assert subsets[2 * img] and subsets[2 * img + 1]


def test_same_seed_same_plan_and_different_seed_differs():
    p1 = sample_partitions(
        4, 64, ratio_range=(0.2, 0.8), keep=0.7, generator=torch.Generator().manual_seed(3)
    )
    p2 = sample_partitions(
        4, 64, ratio_range=(0.2, 0.8), keep=0.7, generator=torch.Generator().manual_seed(3)
    )
    p3 = sample_partitions(
        4, 64, ratio_range=(0.2, 0.8), keep=0.7, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(p1.token_index, p2.token_index) and torch.equal(p1.cu_seqlens, p2.cu_seqlens)
    assert not torch.equal(p1.token_index, p3.token_index)


def test_partitions_are_uniform_over_tokens():
    # Every token lands in subset A about half the time: no positional bias in the sampler.
    n, trials = 16, 4000
    plan = sample_partitions(trials, n, generator=torch.Generator().manual_seed(0))
    in_a = torch.zeros(n)
    for img, seg in enumerate(_subsets(plan)[0::2]):
        in_a[torch.tensor(seg) - img * n] += 1
    assert ((in_a / trials) - 0.5).abs().max() < 0.05


def test_segment_ids_and_to():
    plan = sample_partitions(3, 10, keep=0.5, generator=torch.Generator().manual_seed(0))
    ids = plan.segment_ids()
    assert ids.tolist() == sum(([s] * int(l) for s, l in enumerate(plan.seqlens)), [])
    moved = plan.to("cpu")
    assert moved.max_seqlen == plan.max_seqlen and torch.equal(moved.token_index, plan.token_index)


@pytest.mark.parametrize("k", [3, 4, 7])
@pytest.mark.parametrize("b,n,keep", [(1, 3, 1.0), (3, 7, 1.0), (5, 16, 0.5), (4, 64, 0.3)])
@pytest.mark.parametrize("seed", range(3))
def test_more_subsets_equal_disjoint_and_nonempty(k, b, n, keep, seed):
    g = torch.Generator().manual_seed(seed)
    plan = sample_partitions(b, n, keep=keep, num_subsets=k, generator=g)
    assert plan.subsets_per_image == k and plan.cu_seqlens.shape == (k * b + 1,)
    assert plan.cu_seqlens[-1] == plan.token_index.numel() and plan.max_seqlen == plan.seqlens.max()
    subsets = _subsets(plan)
    n_keep = max(round(keep * n), min(n, k))
    for img in range(b):
        mine = subsets[k * img : k * (img + 1)]
        rows = [r for sub in mine for r in sub]
        assert len(rows) == len(set(rows)) == n_keep, "subsets overlap or miss kept tokens"
        assert all(img * n <= r < (img + 1) * n for r in rows) and all(s == sorted(s) for s in mine)
        sizes = [len(sub) for sub in mine]
        if n_keep >= k:
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        else:  # fewer tokens than subsets: one token each in the first subsets
            assert sizes == [1] * n_keep + [0] * (k - n_keep)


def test_more_subsets_respect_valid_mask_and_two_subsets_are_unchanged():
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(6, 25, generator=g) < 0.5
    valid[0] = False
    valid[1, :2] = True
    valid[1, 2:] = False
    plan = sample_partitions(6, 25, valid_mask=valid, num_subsets=3, generator=g)
    rows = plan.token_index
    assert valid.reshape(-1)[rows].all()
    assert plan.seqlens[:3].tolist() == [0, 0, 0] and plan.seqlens[3:6].tolist() == [1, 1, 0]
    # num_subsets=2 is the default split, draw for draw
    a = sample_partitions(4, 30, keep=0.6, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    b = sample_partitions(4, 30, keep=0.6, num_subsets=2, generator=g)
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.cu_seqlens, b.cu_seqlens)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0, num_tokens=4), "batch_size"),
        (dict(batch_size=2, num_tokens=4, num_subsets=1), "num_subsets"),
        (dict(batch_size=2, num_tokens=4, num_subsets=3, ratio=0.3), "equal size"),
        (dict(batch_size=2, num_tokens=4, num_subsets=3, ratio_range=(0.3, 0.6)), "equal size"),
        (dict(batch_size=2, num_tokens=4, keep=0.0), "keep"),
        (dict(batch_size=2, num_tokens=4, keep=1.5), "keep"),
        (dict(batch_size=2, num_tokens=4, ratio=1.0), "ratio"),
        (dict(batch_size=2, num_tokens=4, ratio_range=(0.6, 0.4)), "ratio_range"),
        (
            dict(batch_size=2, num_tokens=4, valid_mask=torch.ones(2, 5, dtype=torch.bool)),
            "valid_mask",
        ),
        (dict(batch_size=2, num_tokens=4, valid_mask=torch.ones(2, 4)), "valid_mask"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_partitions(**kwargs)


@pytest.mark.parametrize("name", ["batch_size", "num_tokens", "num_subsets", "block_size"])
@pytest.mark.parametrize("value", [2.0, "2", True])
def test_counts_must_be_ints(name, value):
    kwargs = dict(batch_size=2, num_tokens=4, num_subsets=2, block_size=1)
    kwargs[name] = value
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        sample_partitions(**kwargs)
    kwargs[name] = np.int64(2 if name != "block_size" else 1)  # numpy ints are fine
    sample_partitions(**kwargs)
