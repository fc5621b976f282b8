"""Batches of look-alike images (``--batch-grouping similar``): the thumbnail descriptors
against a written-out reference, the order's invariants (a permutation, one group per batch
where the images form groups, the incomplete tail, determinism per seed), the stream's
sharding and exact resume, and a run through the CLI."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.fixtures import make_chestxray14
from spcl_fast.data import TensorImages
from spcl_fast.run.config import TrainConfig
from spcl_fast.run.presets import smoke
from spcl_fast.train.engine import train
from spcl_fast.train.sharding import BatchStream, similar_order, thumbnails


def _reference_thumbnails(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Block means written out cell by cell, then each cell standardised over the images."""
    n, _, side, _ = images.shape
    cell = side // grid
    thumbs = torch.empty(n, grid * grid)
    for i in range(grid):
        for j in range(grid):
            block = images[:, 0, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
            thumbs[:, i * grid + j] = block.mean(dim=(1, 2))
    return (thumbs - thumbs.mean(0)) / thumbs.std(0)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_thumbnails_are_standardised_block_means(grid):
    images = torch.rand(37, 1, 16, 16)
    got = thumbnails(TensorImages(images), grid)
    torch.testing.assert_close(got, _reference_thumbnails(images, grid))
    # a dataset read through a DataLoader gives the same descriptors as the tensor
    torch.testing.assert_close(thumbnails(_Images(images), grid), got)
    # a constant cell has no spread: zeros, not NaN
    flat = images.clone()
    flat[:, :, :4, :4] = 0.5
    assert thumbnails(TensorImages(flat), 4).isfinite().all()
    with pytest.raises(ValueError, match="group_grid must be >= 1"):
        thumbnails(TensorImages(images), 0)


def _clusters(groups: int, size: int, dim: int = 3, seed: int = 0) -> torch.Tensor:
    """``groups`` tight clusters of ``size`` points, far apart, shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = 100.0 * torch.randn(groups, dim, generator=g)
    points = centres.repeat_interleave(size, 0) + 0.01 * torch.randn(groups * size, dim,
                                                                      generator=g)
    return points[torch.randperm(groups * size, generator=g)]


def test_each_batch_is_one_group_of_look_alikes():
    points = _clusters(groups=6, size=8)
    order = similar_order(points, 8, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(48))
    for batch in order.view(6, 8):
        centre = points[batch].mean(0)
        assert (points[batch] - centre).norm(dim=1).max() < 1.0  # one cluster, not two
    # a plain shuffle mixes the clusters: the test can tell the two apart
    shuffled = torch.randperm(48, generator=torch.Generator().manual_seed(1)).view(6, 8)
    assert max((points[b] - points[b].mean(0)).norm(dim=1).max() for b in shuffled) > 10


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), batch=st.integers(1, 16), dim=st.integers(1, 5),
       seed=st.integers(0, 2**16), duplicates=st.booleans())
def test_order_is_a_permutation_with_the_tail_last(n, batch, dim, seed, duplicates):
    g = torch.Generator().manual_seed(seed)
    points = torch.zeros(n, dim) if duplicates else torch.randn(n, dim, generator=g)
    order = similar_order(points, batch, torch.Generator().manual_seed(seed))
    assert sorted(order.tolist()) == list(range(n))
    # the same seed gives the same order
    assert torch.equal(order, similar_order(points, batch, torch.Generator().manual_seed(seed)))


def test_groups_change_from_epoch_to_epoch_and_stay_similar():
    points = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    orders = [similar_order(points, 16, torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(orders[0], orders[1])

    def spread(order):  # mean within-batch variance of the descriptors
        return torch.stack([points[b].var(0).sum() for b in order.view(-1, 16)]).mean()

    random = torch.randperm(256, generator=torch.Generator().manual_seed(2))
    assert spread(orders[0]) < 0.6 * spread(random)  # measured: 0.50


def test_similar_stream_shards_over_ranks_and_resumes():
    n, batch = 40, 8
    images = torch.rand(n, 1, 8, 8)
    images += torch.arange(n).view(n, 1, 1, 1) % 5  # 5 groups of distinct brightness
    resident = TensorImages(images)
    single = BatchStream(resident, batch, seed=3, grouping="similar", group_grid=2)
    ranks = [BatchStream(resident, batch, seed=3, world=2, rank=r, grouping="similar",
                         group_grid=2) for r in range(2)]
    loader = BatchStream(_Images(images), batch, seed=3, grouping="similar", group_grid=2)
    batches = []
    for _ in range(2 * n // batch):  # two epochs
        whole = single.next()
        assert torch.equal(torch.cat([s.next() for s in ranks]), whole)
        assert torch.equal(loader.next(), whole)
        assert whole.mean(dim=(1, 2, 3)).floor().unique().numel() == 1  # one brightness group
        batches.append(whole)
    resumed = BatchStream(resident, batch, seed=3, grouping="similar", group_grid=2)
    replay = BatchStream(resident, batch, seed=3, grouping="similar", group_grid=2)
    for _ in range(3):
        replay.next()
    resumed.load_state_dict(replay.state_dict())
    assert all(torch.equal(resumed.next(), b) for b in batches[3:])
    with pytest.raises(ValueError, match="batch_grouping must be 'random' or 'similar'"):
        BatchStream(resident, batch, seed=0, grouping="nearest")


def test_group_grid_is_checked():
    with pytest.raises(ValueError, match="group_grid must be from 1 to image_size, got 64"):
        smoke().replace(batch_grouping="similar", group_grid=64).check()


def test_similar_batches_train_through_the_cli_and_resume_exactly(tmp_path):
    from spcl_fast.train.__main__ import main

    run = tmp_path / "run"
    main(["--preset", "smoke", "--steps", "4", "--save-every", "2", "--out", str(run),
          "--probe", "no", "--batch-grouping", "similar", "--group-grid", "2"])
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert (config.data.batch_grouping, config.data.group_grid) == ("similar", 2)
    train(config, tmp_path / "resumed", resume=run / "ckpt-00000002.pt")

    def losses(path):
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert losses(tmp_path / "resumed") == losses(run)[2:]
    # a real dataset (read once for its thumbnails through the DataLoader) trains too
    root = make_chestxray14(tmp_path / "nih", n=24, size=32)
    real = smoke().replace(dataset="chestxray14", data_root=str(root), num_workers=0,
                           batch_size=8, steps=2, probe=False, batch_grouping="similar")
    assert train(real, tmp_path / "real")["steps"] == 2
