"""A run's data: the dataset of each split, the images as tensors for probing, and the input
statistics and normalisation that training and evaluation share.

Example::

    >>> from spcl_fast.run.presets import smoke
    >>> images, labels, names = load_split(smoke(), "train")
    >>> images.shape, labels.shape, names[0]
    (torch.Size([64, 1, 32, 32]), torch.Size([64, 5]), 'cardiomegaly')
    >>> intensity_stats("synthetic", images) == (synthetic.MEAN, synthetic.STD)
    True
"""

from __future__ import annotations

import warnings

import torch

from ..data import CXRPool, build_dataset, normalize_images, synthetic
from .config import DataConfig, TrainConfig


def _per_dataset(value: str | None, count: int, key: str) -> list[str | None]:
    """A pool's comma-separated ``data_root``/``data_cache``: one entry per dataset
    (``none`` or empty: no value for that one)."""
    if value is None or count == 1:
        return [value] * count
    parts = [None if p.strip().lower() in ("", "none") else p.strip() for p in value.split(",")]
    if len(parts) != count:
        raise ValueError(f"--{key.replace('_', '-')} names {len(parts)} folders for {count} "
                         f"pooled datasets (give one per dataset, comma-separated)")
    return parts


def load_split(config: TrainConfig, split: str):
    """The dataset of a split: the synthetic set rendered into memory (``(n, 1, S, S)``
    tensor), a real one (or a pool ``a+b`` of real ones, :class:`~spcl_fast.data.CXRPool`) as a
    map-style dataset that skips unreadable files. Returns ``(images_or_dataset, labels (n, C),
    class_names)``."""
    data: DataConfig = config.data
    if data.dataset == "synthetic":
        kwargs = {"seed": 0}
        if data.num_images is not None and split == "train":
            kwargs["num_images"] = data.num_images
        ds = build_dataset("synthetic", None, split, data.image_size, **kwargs)
        return ds.images(), ds.labels, tuple(ds.class_names)
    names = data.dataset.split("+")
    roots = _per_dataset(data.data_root, len(names), "data_root")
    caches = _per_dataset(data.data_cache, len(names), "data_cache")
    members = [
        build_dataset(name, root, split, data.image_size, cache=cache, on_error="skip")
        for name, root, cache in zip(names, roots, caches, strict=True)
    ]
    ds = members[0] if len(members) == 1 else CXRPool(members, names=names)
    if data.num_images is not None and split == "train":
        ds = torch.utils.data.Subset(ds, range(min(data.num_images, len(ds))))
        labels, names = ds.dataset.labels[: len(ds)], ds.dataset.class_names
        return ds, labels, tuple(names)
    return ds, ds.labels, tuple(ds.class_names)


def as_tensor(source, batch_size: int = 256, num_workers: int = 0,
              purpose: str = "the probe") -> torch.Tensor:
    """All images of an in-memory tensor or a dataset, ``(n, 1, S, S)`` (``purpose``: what
    unreadable ones are left out of, in :func:`materialize`'s warning)."""
    return source if isinstance(source, torch.Tensor) else materialize(
        source, None, batch_size, num_workers, purpose)[0]


def materialize(source, labels: torch.Tensor | None, batch_size: int = 256,
                num_workers: int = 0,
                purpose: str = "the probe") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and labels of a split as tensors (for probing). ``labels`` are one row per item
    of ``source`` (its own labels, or other targets such as metadata). A dataset that skips an
    unreadable file returns the next item in its place: such stand-ins are left out with their
    rows (a probe must not count one image twice), with a warning that they are left out of
    ``purpose``."""
    if isinstance(source, torch.Tensor):
        return source, labels
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.float32)
    expected = getattr(source, "ids", None)
    if expected is None and isinstance(source, torch.utils.data.Subset):  # --num-images
        ids = getattr(source.dataset, "ids", None)
        expected = None if ids is None else [ids[i] for i in source.indices]
    if expected is not None:
        got = [i for b in batches for i in b["id"]]
        own = torch.tensor([a == b for a, b in zip(got, expected, strict=True)])
        if not own.all():
            warnings.warn(f"{int((~own).sum())} unreadable images left out of {purpose}",
                          stacklevel=2)
            images, labels = images[own], None if labels is None else labels[own]
    return images, labels


def intensity_stats(dataset: str, train, num_workers: int = 0,
                    count: int = 256) -> tuple[float, float]:
    """Dataset-wide pixel mean and std for ``normalize="dataset"``: fixed constants for the
    synthetic set, measured on the first ``count`` training images of a real one (``train``:
    an image tensor or a dataset). Training records them in its checkpoints; evaluation
    measures them so where a checkpoint has none."""
    if dataset == "synthetic":
        return synthetic.MEAN, synthetic.STD
    n = min(count, len(train))
    sample = as_tensor(torch.utils.data.Subset(train, range(n)) if not isinstance(
        train, torch.Tensor) else train[:n], num_workers=num_workers,
        purpose="the intensity statistics")
    return sample.mean().item(), sample.std().item()


def normalizer(mode: str, stats: tuple[float, float]):
    """The input transform ``(B, 1, S, S) in [0, 1] -> normalised`` of ``mode`` (see
    :func:`spcl_fast.data.normalize_images`) with the dataset statistics ``stats``."""
    mean, std = stats
    return lambda x: normalize_images(x, mode, mean, std)
