"""Unlabelled folders of radiographs, and pools of datasets, for pre-training.

:class:`CXRFolder` takes any tree of PNG/JPEG/DICOM files (hidden files and folders skipped,
symlinked folders not followed), ids = paths relative to the root. :class:`CXRPool` concatenates
datasets of the same image size into one pre-training pool.
"""

from __future__ import annotations

import operator
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import CXRDataset, Index
from .images import IMAGE_EXTENSIONS
from .splits import assign_groups


class CXRFolder(CXRDataset):
    """Every image file under ``root`` (recursively), unlabelled (C = 0).

    Args:
        root: any folder.
        split: ``"all"`` (default) or ``"train"``/``"val"``/``"test"``: a deterministic cut by
            ``fractions`` of the top-level subfolders (a patient folder in most layouts; files
            directly in ``root`` count one each), so a folder never straddles two splits.
        image_size: side S of the returned square images.
        cache: a folder from ``python -m spcl_fast.data.prepare --dataset folder``.
        extensions: file name endings taken as images (case-insensitive).
        fractions, seed: the cut for ``split != "all"``.
        on_error, missing: bad-file policy (:mod:`spcl_fast.data.base`).

    ``ds[i]`` is ``{"image": float32 (1, S, S), "labels": float32 (0,), "id": "a/b.png"}``;
    ``ds.patient_ids`` are the top-level subfolders.

    Example::

        >>> import tempfile, numpy as np; from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> Image.fromarray(np.zeros((8, 8), np.uint8)).save(root + "/a.png")
        >>> ds = CXRFolder(root, image_size=16)
        >>> len(ds), ds[0]["image"].shape, ds[0]["labels"].shape, ds.ids
        (1, torch.Size([1, 16, 16]), torch.Size([0]), ['a.png'])
    """

    class_names = ()
    name = "folder"

    def __init__(self, root, split="all", image_size=224, cache=None,
                 extensions=IMAGE_EXTENSIONS, fractions=(0.9, 0.05, 0.05), seed=0,
                 on_error="raise", missing="skip"):
        if len(fractions) != 3:
            raise ValueError(f"fractions must be (train, val, test), got {fractions!r}")
        self.extensions = tuple(e.lower() for e in extensions)
        self.fractions, self.seed = tuple(float(f) for f in fractions), seed
        super().__init__(root, split, image_size, cache, on_error, missing)

    def _read_index(self) -> Index:
        ids = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(folder, self.root)
            for f in sorted(files):
                if not f.startswith(".") and f.lower().endswith(self.extensions):
                    ids.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        groups = [i.split("/", 1)[0] for i in ids]
        split = assign_groups(groups, dict(zip(("train", "val", "test"), self.fractions,
                                               strict=True)), self.seed)
        paths = [os.path.join(self.root, *i.split("/")) for i in ids]
        return Index(ids, paths, np.zeros((len(ids), 0), np.float32), split, groups)


class CXRPool(Dataset):
    """Several datasets as one (a pre-training pool), like ``ConcatDataset`` but with the
    dataset API: ``ids`` are ``"<name>/<id>"``, ``class_names`` the union of the members'
    (first-seen order) and ``labels`` NaN where a member has no such class; ``patient_ids``
    prefixed the same way (a member without them counts one patient per image).

    Args:
        datasets: members; all must return the same image size.
        names: prefix of each member's ids (default: its ``name`` attribute, else ``d<k>``); a
            repeated name (one dataset from two roots) is numbered: ``name``, ``name-2``, ...

    Example::

        >>> from spcl_fast.data import SyntheticCXR
        >>> pool = CXRPool([SyntheticCXR("val", num_images=3), SyntheticCXR("test",
        ...                 num_images=2)], names=["a", "b"])
        >>> len(pool), pool.ids[3], pool[3]["image"].shape, pool.labels.shape
        (5, 'b/synthetic-test-000000', torch.Size([1, 64, 64]), torch.Size([5, 5]))
    """

    def __init__(self, datasets, names=None):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("CXRPool needs at least one dataset")
        names = list(names) if names is not None else [
            getattr(d, "name", "") or f"d{k}" for k, d in enumerate(self.datasets)]
        if len(names) != len(self.datasets):
            raise ValueError(f"names must be one per dataset, got {names!r}")
        count: dict[str, int] = {}
        for k, name in enumerate(names):  # one dataset from several roots: name, name-2, ...
            count[name] = count.get(name, 0) + 1
            names[k] = name if count[name] == 1 else f"{name}-{count[name]}"
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique, one per dataset, got {names!r}")
        sizes = {int(d.image_size) for d in self.datasets}
        if len(sizes) != 1:
            raise ValueError(f"datasets return different image sizes {sorted(sizes)}")
        self.image_size = sizes.pop()
        self.names = list(names)
        self.class_names = tuple(dict.fromkeys(c for d in self.datasets for c in d.class_names))
        self._columns = [torch.tensor([self.class_names.index(c) for c in d.class_names],
                                      dtype=torch.long) for d in self.datasets]
        self.ids, self.patient_ids, blocks = [], [], []
        for d, name, cols in zip(self.datasets, self.names, self._columns, strict=True):
            self.ids += [f"{name}/{i}" for i in d.ids]
            pids = getattr(d, "patient_ids", None) or d.ids
            self.patient_ids += [f"{name}/{p}" for p in pids]
            block = torch.full((len(d), len(self.class_names)), float("nan"))
            block[:, cols] = torch.as_tensor(d.labels, dtype=torch.float32).reshape(len(d), -1)
            blocks.append(block)
        self.labels = torch.cat(blocks)
        self._offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index) -> dict:
        j = operator.index(index)
        if not -len(self) <= j < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        j %= len(self)
        k = int(np.searchsorted(self._offsets, j, side="right")) - 1
        item = dict(self.datasets[k][j - int(self._offsets[k])])
        labels = torch.full((len(self.class_names),), float("nan"))
        labels[self._columns[k]] = item["labels"]
        item["labels"], item["id"] = labels, f"{self.names[k]}/{item['id']}"
        return item

    def images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Items ``start:stop`` as float32 ``(n, 1, S, S)``."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) out of bounds for {len(self)} items")
        return torch.stack([self[j]["image"] for j in range(start, stop)]) if stop > start \
            else torch.empty(0, 1, self.image_size, self.image_size)
