"""NIH ChestX-ray14 in its official layout.

::

    root/
      Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv)
      train_val_list.txt          official train+val image names
      test_list.txt               official test image names
      images/<Image Index>        (the Kaggle mirror's images_001/images/ ... also work)

The CSV is read leniently where the releases differ: the 2017 file's trailing empty column,
ages written like ``060Y``, and the bracketed headers (``OriginalImage[Width,Height]``) that a
CSV reader splits in two are all ignored; only ``Image Index``, ``Finding Labels`` and
``Patient ID`` are required. ``Finding Labels`` is split on ``|`` and each token matched exactly
against the 14 class names (or ``No Finding``); anything else is a :class:`DataFormatError`.

Splits: ``test`` is the official test list; ``train``/``val`` cut the official train_val list
by patient (``val_fraction`` of its patients, :func:`~spcl_fast.data.splits.assign_groups`
with ``seed``); ``all`` is every CSV row. The official lists are patient-disjoint, so all three
are. Images are fitted to ``S x S`` by the policy of :mod:`spcl_fast.data.images`.
"""

from __future__ import annotations

import os

import numpy as np

from .base import CXRDataset, Index, read_csv, read_text
from .errors import DataFormatError
from .splits import assign_groups

CLASS_NAMES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


def _read_list(path: str) -> set[str]:
    return {line.strip() for line in read_text(path).splitlines() if line.strip()}


class ChestXray14(CXRDataset):
    """NIH ChestX-ray14 (112,120 frontal radiographs, 14 findings, 30,805 patients).

    Args:
        root: folder in the official layout (module docstring).
        split: ``"train"``, ``"val"``, ``"test"`` (official) or ``"all"``.
        image_size: side S of the returned square images.
        cache: a folder written by ``python -m spcl_fast.data.prepare --dataset chestxray14``
            (or a :class:`~spcl_fast.data.cache.CacheReader`); items then come from it.
        val_fraction: share of the train_val patients that form ``val``.
        seed: which patient-disjoint train/val cut.
        on_error, missing: bad-file policy (:mod:`spcl_fast.data.base`).

    ``ds[i]`` is ``{"image": float32 (1, S, S) in [0, 1], "labels": float32 (14,) of 0/1,
    "id": "<Image Index>"}``; ``ds.labels`` (n, 14), ``ds.ids``, ``ds.patient_ids``,
    ``ds.class_names`` (:data:`CLASS_NAMES`), ``ds.view_positions`` (PA/AP or ""),
    ``ds.sexes`` (M/F or "").

    Example::

        >>> import tempfile
        >>> from devtools.fixtures import make_chestxray14
        >>> root = make_chestxray14(tempfile.mkdtemp(), n=12)  # a tiny copy of the layout
        >>> ds = ChestXray14(root, "test", image_size=64)
        >>> len(ds), ds[0]["image"].shape, ds.labels.shape, ds.ids[0]
        (3, torch.Size([1, 64, 64]), torch.Size([3, 14]), '00000004_000.png')
    """

    class_names = CLASS_NAMES
    name = "chestxray14"

    def __init__(self, root, split="train", image_size=224, cache=None, val_fraction=0.1,
                 seed=0, on_error="raise", missing="skip"):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.val_fraction, self.seed = val_fraction, seed
        super().__init__(root, split, image_size, cache, on_error, missing)

    def _image_dirs(self) -> list[str]:
        dirs = [os.path.join(self.root, "images")]
        with os.scandir(self.root) as it:  # the Kaggle mirror: images_001/images/, ...
            dirs += sorted(os.path.join(e.path, "images") for e in it
                           if e.is_dir() and e.name.startswith("images_"))
        return [d for d in dirs if os.path.isdir(d)]

    def _read_index(self) -> Index:
        csv_path = next((os.path.join(self.root, n) for n in CSV_NAMES
                         if os.path.isfile(os.path.join(self.root, n))), None)
        if csv_path is None:
            raise DataFormatError(f"{self.root}: no {' or '.join(CSV_NAMES)}")
        cols = read_csv(csv_path, ["Image Index", "Finding Labels", "Patient ID"],
                        optional=["View Position", "Patient Gender"])
        names, patients = cols["Image Index"], cols["Patient ID"]
        where = {}
        for d in self._image_dirs():
            with os.scandir(d) as it:
                for e in it:
                    where.setdefault(e.name, e.path)
        labels = np.zeros((len(names), len(CLASS_NAMES)), np.float32)
        column = {c: k for k, c in enumerate(CLASS_NAMES)}
        seen, paths = set(), []
        for row, (name, findings) in enumerate(zip(names, cols["Finding Labels"], strict=True)):
            line = f"{csv_path}: line {row + 2}"
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise DataFormatError(f"{line}: Image Index {name!r} is not a file name")
            if name in seen:
                raise DataFormatError(f"{line}: duplicate Image Index {name!r}")
            seen.add(name)
            for token in findings.split("|"):
                token = token.strip()
                if token == "No Finding":
                    continue
                if token not in column:
                    raise DataFormatError(f"{line}: unknown finding {token!r} "
                                          f"(expected one of {CLASS_NAMES} or 'No Finding')")
                labels[row, column[token]] = 1.0
            paths.append(where.get(name, os.path.join(self.root, "images", name)))
        split = np.full(len(names), "none", dtype=object)
        lists = [os.path.join(self.root, n) for n in ("train_val_list.txt", "test_list.txt")]
        if all(os.path.isfile(p) for p in lists):
            train_val, test = (_read_list(p) for p in lists)
            split[[n in test for n in names]] = "test"
            tv = np.array([n in train_val and n not in test for n in names], bool)
            if tv.any():
                split[tv] = assign_groups(
                    [patients[j] for j in np.flatnonzero(tv)],
                    {"train": 1 - self.val_fraction, "val": self.val_fraction}, self.seed)
        elif self.split != "all":
            raise DataFormatError(f"{self.root}: split {self.split!r} needs the official "
                                  f"train_val_list.txt and test_list.txt")
        return Index(list(names), paths, labels, split, list(patients),
                     extra={"view_positions": cols["View Position"],
                            "sexes": cols["Patient Gender"]})
