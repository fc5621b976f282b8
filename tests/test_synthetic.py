"""SyntheticCXR: contract, determinism, split disjointness, labels, findings, validation."""

import dataclasses
import doctest
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spcl_fast.data import synthetic
from spcl_fast.data.synthetic import CLASS_NAMES, MEAN, STD, SyntheticCXR

REPO = Path(__file__).resolve().parents[1]


def _digest(image):
    return hashlib.sha256(image.numpy().tobytes()).hexdigest()


def test_item_contract():
    ds = SyntheticCXR("val", num_images=6, image_size=64)
    assert len(ds) == 6 and ds.class_names == CLASS_NAMES
    assert ds.ids == [f"synthetic-val-{i:06d}" for i in range(6)]
    assert ds.labels.dtype == torch.float32 and ds.labels.shape == (6, 5)
    for i in range(len(ds)):
        item = ds[i]
        img, labels = item["image"], item["labels"]
        assert img.dtype == torch.float32 and img.shape == (1, 64, 64)
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
        assert labels.dtype == torch.float32 and labels.shape == (5,)
        assert set(labels.tolist()) <= {0.0, 1.0}
        assert item["id"] == ds.ids[i]
    assert ds[-1]["id"] == ds.ids[5]


def test_default_split_sizes():
    assert [len(SyntheticCXR(s)) for s in ("train", "val", "test", "all")] == [2048, 512, 512, 3072]


@pytest.mark.parametrize("size", [32, 100, 128, 224])
def test_other_sizes(size):
    img = SyntheticCXR("test", num_images=1, image_size=size)[0]["image"]
    assert img.shape == (1, size, size) and 0 <= img.min() and img.max() <= 1


def test_deterministic_across_instances_and_access_order():
    a = SyntheticCXR("train", num_images=10, seed=3)
    b = SyntheticCXR("train", num_images=10, seed=3)
    forward = [a[i]["image"] for i in range(10)]
    backward = {i: b[i]["image"] for i in reversed(range(10))}
    for i in range(10):
        assert torch.equal(forward[i], backward[i])
    assert torch.equal(a[4]["image"], a[4]["image"])
    assert torch.equal(a.labels, b.labels)
    # Index i is the same phantom whatever the split size; another seed changes it.
    assert torch.equal(SyntheticCXR("train", num_images=5, seed=3)[4]["image"], forward[4])
    assert not torch.equal(SyntheticCXR("train", num_images=10, seed=4)[4]["image"], forward[4])


def test_deterministic_across_processes():
    ds = SyntheticCXR("val", num_images=3, image_size=48, seed=7)
    code = (
        "import hashlib\n"
        "from spcl_fast.data.synthetic import SyntheticCXR\n"
        "item = SyntheticCXR('val', num_images=3, image_size=48, seed=7)[2]\n"
        "digest = hashlib.sha256(item['image'].numpy().tobytes()).hexdigest()\n"
        "print(digest, item['labels'].tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split(maxsplit=1)
    assert out[0] == _digest(ds[2]["image"])
    assert out[1].strip() == str(ds[2]["labels"].tolist())


def test_splits_are_disjoint_and_all_concatenates():
    n = 32
    digests = {
        s: {_digest(SyntheticCXR(s, num_images=n)[i]["image"]) for i in range(n)}
        for s in ("train", "val", "test")
    }
    assert all(len(d) == n for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]

    full = SyntheticCXR("all")
    assert full.ids[2048] == "synthetic-val-000000" and full.ids[-1] == "synthetic-test-000511"
    assert torch.equal(full[2048]["image"], SyntheticCXR("val")[0]["image"])
    parts = [SyntheticCXR(s).labels for s in ("train", "val", "test")]
    assert torch.equal(full.labels, torch.cat(parts))


def test_labels_need_no_rendering_and_match_items(monkeypatch):
    def no_render(*args):
        raise AssertionError("labels must not render")

    monkeypatch.setattr(synthetic, "_render", no_render)
    labels = SyntheticCXR("test", num_images=20).labels
    monkeypatch.undo()
    ds = SyntheticCXR("test", num_images=20)
    assert torch.equal(torch.stack([ds[i]["labels"] for i in range(20)]), labels)


def test_prevalences():
    prevalence = SyntheticCXR("train", num_images=512).labels.mean(0)
    assert torch.all(prevalence > 0.13) and torch.all(prevalence < 0.42), prevalence


@pytest.mark.parametrize("finding", CLASS_NAMES)
def test_each_finding_changes_image_locally(finding):
    c = CLASS_NAMES.index(finding)
    for index in range(4):
        case = synthetic._case((0, 0, index))
        without = tuple(on and k != c for k, on in enumerate(case.labels))
        with_ = tuple(on or k == c for k, on in enumerate(case.labels))
        a = synthetic._render(dataclasses.replace(case, labels=without), 64)
        b = synthetic._render(dataclasses.replace(case, labels=with_), 64)
        diff = np.abs(b - a)
        changed = (diff > 1e-3).mean()
        assert diff.max() > 0.05, (finding, index)
        assert 0 < changed < 0.25, (finding, index, changed)


def test_images_equals_stacked_items():
    ds = SyntheticCXR("val", num_images=8, image_size=40)
    batch = ds.images(2, 6)
    assert batch.dtype == torch.float32 and batch.shape == (4, 1, 40, 40)
    assert torch.equal(batch, torch.stack([ds[i]["image"] for i in range(2, 6)]))
    assert ds.images().shape == (8, 1, 40, 40)
    assert ds.images(3, 3).shape == (0, 1, 40, 40)


def test_normalize():
    raw = SyntheticCXR("train", num_images=64)
    norm = SyntheticCXR("train", num_images=64, normalize=True)
    x = norm.images()
    assert abs(x.mean().item()) < 0.15 and abs(x.std().item() - 1) < 0.15
    assert torch.allclose(norm[3]["image"], (raw[3]["image"] - MEAN) / STD)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "training"}, "split"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"num_images": 0}, "num_images"),
        ({"split": "all", "num_images": 10}, "all"),
        ({"seed": -1}, "seed"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticCXR(**kwargs)


def test_index_errors():
    ds = SyntheticCXR("val", num_images=4)
    for bad in (4, -5, 100):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(IndexError):
        ds.images(2, 5)
    with pytest.raises(IndexError):
        ds.images(3, 2)


def test_docstring_example():
    result = doctest.testmod(synthetic)
    assert result.failed == 0 and result.attempted > 0


def test_global_intensity_statistics_do_not_reveal_findings():
    """Exposure, window and anatomy vary far more than any finding shifts the whole image: a
    probe on each image's intensity histogram, mean and std stays near chance."""
    from spcl_fast.eval.linear_probe import linear_probe

    def stats(split, n):
        ds = SyntheticCXR(split, num_images=n, image_size=32)
        x = ds.images().flatten(1)
        bins = torch.nn.functional.one_hot((x * 8).long().clamp(max=7), 8).float().mean(1)
        return torch.cat([bins, x.mean(1, keepdim=True), x.std(1, keepdim=True)], 1), ds.labels

    res = linear_probe(stats("train", 1024), stats("val", 256), stats("test", 512),
                       class_names=CLASS_NAMES)
    assert all(auc < 0.62 for auc in res["per_class_auroc"].values()), res["per_class_auroc"]
