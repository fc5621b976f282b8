"""A run's data: the dataset of each split, the images as tensors for probing, and the input
statistics and normalisation that training and evaluation share.

Example::

    >>> from spcl_fast.run.presets import smoke
    >>> train, labels, names = load_split(smoke(), "train")
    >>> materialize(train, labels)[0].shape, labels.shape, names[0]
    (torch.Size([64, 1, 32, 32]), torch.Size([64, 5]), 'cardiomegaly')
    >>> intensity_stats("synthetic", train) == (synthetic.MEAN, synthetic.STD)
    True
"""

from __future__ import annotations

import warnings

import torch

from ..data import CXRPool, TensorImages, build_dataset, normalize_images, synthetic
from ..data.memory import resident_images
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
    """The dataset of a split, always a map-style dataset: the synthetic set rendered once into
    memory (:class:`~spcl_fast.data.TensorImages`), the embedded NIH films, or a real dataset
    (or a pool ``a+b`` of real ones, :class:`~spcl_fast.data.CXRPool`) that skips unreadable
    files; ``--num-images`` takes a ``Subset`` of a real training split. Returns ``(dataset,
    labels (n, C), class_names)``."""
    data: DataConfig = config.data
    if data.dataset == "synthetic":
        kwargs = {"seed": 0}
        if data.num_images is not None and split == "train":
            kwargs["num_images"] = data.num_images
        ds = build_dataset("synthetic", None, split, data.image_size, **kwargs)
        return (TensorImages(ds.images(), ds.labels, ds.ids, ds.class_names), ds.labels,
                tuple(ds.class_names))
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


def materialize(source, labels: torch.Tensor | None, batch_size: int = 256,
                num_workers: int = 0,
                purpose: str = "the probe") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and labels of a split (a dataset) as tensors (for probing). ``labels`` are one
    row per item of ``source`` (its own labels, or other targets such as metadata). A dataset
    held in memory is indexed at once. One read item by item that skips an unreadable file
    returns the next item in its place: such stand-ins are left out with their rows (a probe
    must not count one image twice), with a warning that they are left out of ``purpose``."""
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.float32)
    resident = resident_images(source)
    if resident is not None:
        return resident, labels
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
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
    its training dataset). Training records them in its checkpoints; evaluation measures them
    so where a checkpoint has none."""
    if dataset == "synthetic":
        return synthetic.MEAN, synthetic.STD
    sample = materialize(torch.utils.data.Subset(train, range(min(count, len(train)))), None,
                         num_workers=num_workers, purpose="the intensity statistics")[0]
    return sample.mean().item(), sample.std().item()


def normalizer(mode: str, stats: tuple[float, float]):
    """The input transform ``(B, 1, S, S) in [0, 1] -> normalised`` of ``mode`` (see
    :func:`spcl_fast.data.normalize_images`) with the dataset statistics ``stats``."""
    mean, std = stats
    return lambda x: normalize_images(x, mode, mean, std)
