"""One way to hold a split: always a dataset. Datasets that keep their films in memory (the
synthetic set once rendered, the embedded NIH films, :class:`TensorImages`) say so with a
class attribute ``in_memory = True`` and an ``images()`` method returning the whole split as
one tensor; training, probing and the studies then index that tensor instead of reading item by
item (:func:`resident_images`). Anything else (files, even with an ``images()`` that decodes
them) is read through a ``DataLoader``.

Example::

    >>> import torch
    >>> ds = TensorImages(torch.rand(6, 1, 8, 8), patient_ids=list("aabbcd"))
    >>> resident_images(torch.utils.data.Subset(ds, [4, 0])).shape
    torch.Size([2, 1, 8, 8])
    >>> group_ids(ds).tolist()
    [0, 0, 1, 1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset


class TensorImages(Dataset):
    """Images already in memory, ``(n, 1, S, S)`` float, as a dataset under the data contract:
    ``ds[i]`` is ``{"image", "labels", "id"}``; ``labels`` ``(n, C)`` (default ``(n, 0)``),
    ``ids`` (default ``"image-<i>"``), ``class_names`` and ``patient_ids`` (or None)."""

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 ids: Sequence[str] | None = None, class_names: Sequence[str] = (),
                 patient_ids: Sequence[str] | None = None):
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be a (n, 1, S, S) tensor, got {got}")
        n = images.shape[0]
        labels = torch.zeros(n, 0) if labels is None else torch.as_tensor(labels).float()
        for name, value in (("labels", labels), ("ids", ids), ("patient_ids", patient_ids)):
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} images")
        self._images, self.labels = images, labels.reshape(n, -1)
        self.ids = [f"image-{i}" for i in range(n)] if ids is None else list(ids)
        self.class_names = tuple(class_names)
        self.patient_ids = None if patient_ids is None else list(patient_ids)

    def __len__(self) -> int:
        return self._images.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index], "labels": self.labels[index], "id": self.ids[index]}

    def images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images ``start:stop``, ``(n, 1, S, S)``."""
        return self._images[start:stop]


def _base(source) -> tuple[Dataset, list[int] | None]:
    """The dataset under a (possibly nested) ``Subset`` and the rows of it that ``source``
    holds (None: all of them)."""
    rows = None
    while isinstance(source, Subset):
        picked = list(source.indices)
        rows = picked if rows is None else [picked[i] for i in rows]
        source = source.dataset
    return source, rows


def _check_dataset(source) -> None:
    if isinstance(source, torch.Tensor):
        raise TypeError("a split is a dataset, not a tensor: wrap images in "
                        "spcl_fast.data.TensorImages(images)")


def resident_images(source) -> torch.Tensor | None:
    """Every image of ``source`` (a dataset, or a ``Subset`` of one) as one ``(n, 1, S, S)``
    tensor when the dataset holds them in memory (``in_memory``, module docstring); ``None``
    for a dataset read item by item."""
    _check_dataset(source)
    base, rows = _base(source)
    if not getattr(base, "in_memory", False):
        return None
    images = base.images()
    return images if rows is None else images[torch.as_tensor(rows, dtype=torch.long)]


def group_ids(source) -> torch.Tensor | None:
    """Each item's patient as an int64 id, ``(n,)`` (ids numbered in first-seen order of the
    whole dataset, so a ``Subset`` keeps its dataset's numbering); ``None`` when the dataset
    has no ``patient_ids``."""
    _check_dataset(source)
    base, rows = _base(source)
    pids = getattr(base, "patient_ids", None)
    if pids is None:
        return None
    number: dict[str, int] = {}
    ids = torch.tensor([number.setdefault(str(p), len(number)) for p in pids], dtype=torch.long)
    return ids if rows is None else ids[torch.as_tensor(rows, dtype=torch.long)]
