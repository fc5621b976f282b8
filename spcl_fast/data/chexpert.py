"""CheXpert (Stanford) in its official layout, full or downsampled ("small") release.

::

    root/                         CheXpert-v1.0-small/ or CheXpert-v1.0/ (or the folder
      train.csv                   holding one of them)
      valid.csv
      train/patient00001/study1/view1_frontal.jpg ...
      valid/...

``Path`` values start with ``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``; that first folder is
stripped and the rest resolved under ``root`` (paths with ``..`` or absolute paths are a
:class:`DataFormatError`). The id of an image is that relative path
(``train/patient00001/study1/view1_frontal.jpg``), its patient the ``patientNNNNN`` folder.

Labels: 1 positive, 0 or blank negative, -1 uncertain mapped by ``uncertain``: ``"ones"``,
``"zeros"`` or ``"ignore"`` (NaN: losses and metrics skip it). ``classes="competition"`` gives
the five competition findings, ``"all"`` the 14 columns.

Splits: ``test`` is ``valid.csv`` (the official validation set, 200 studies, radiologist
consensus labels); ``train``/``val`` cut ``train.csv`` by patient (``val_fraction``, ``seed``);
``all`` is both files. ``frontal_only`` (default) keeps ``Frontal/Lateral == "Frontal"``.
Images (portrait JPEGs) are fitted by the policy of :mod:`spcl_fast.data.images`.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .base import CXRDataset, Index, read_csv, safe_join
from .errors import DataFormatError
from .splits import assign_groups

ALL_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
COMPETITION_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                       "Pleural Effusion")
_RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")


class CheXpert(CXRDataset):
    """CheXpert chest radiographs with 5 (competition) or 14 findings.

    Args:
        root: the release folder (module docstring).
        split: ``"train"``, ``"val"`` (patient-disjoint cuts of train.csv), ``"test"``
            (valid.csv) or ``"all"``.
        image_size: side S of the returned square images.
        cache: a folder from ``python -m spcl_fast.data.prepare --dataset chexpert``.
        uncertain: ``"ignore"`` (-1 -> NaN), ``"ones"`` or ``"zeros"``.
        classes: ``"competition"`` (5) or ``"all"`` (14).
        frontal_only: keep frontal views only.
        val_fraction, seed: the train/val cut of train.csv patients.
        on_error, missing: bad-file policy (:mod:`spcl_fast.data.base`).

    ``ds[i]`` is ``{"image": float32 (1, S, S), "labels": float32 (C,) of 0/1/NaN,
    "id": "train/patient00001/study1/view1_frontal.jpg"}``; ``ds.patient_ids``,
    ``ds.views`` ("Frontal"/"Lateral").

    Example::

        >>> import tempfile
        >>> from devtools.fixtures import make_chexpert
        >>> root = make_chexpert(tempfile.mkdtemp(), n_train=8, n_valid=3)
        >>> ds = CheXpert(root, "test", image_size=64)
        >>> len(ds), ds[0]["image"].shape, ds.labels.shape
        (2, torch.Size([1, 64, 64]), torch.Size([2, 5]))
        >>> ds.ids[0], ds.patient_ids[0]
        ('valid/patient64550/study1/view2_frontal.jpg', 'patient64550')
    """

    name = "chexpert"

    def __init__(self, root, split="train", image_size=224, cache=None, uncertain="ignore",
                 classes="competition", frontal_only=True, val_fraction=0.1, seed=0,
                 on_error="raise", missing="skip"):
        if uncertain not in ("ignore", "ones", "zeros"):
            raise ValueError(f"uncertain must be 'ignore', 'ones' or 'zeros', got {uncertain!r}")
        if classes not in ("competition", "all"):
            raise ValueError(f"classes must be 'competition' or 'all', got {classes!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.uncertain, self.frontal_only = uncertain, frontal_only
        self.val_fraction, self.seed = val_fraction, seed
        self.class_names = COMPETITION_CLASSES if classes == "competition" else ALL_CLASSES
        super().__init__(_release_root(root), split, image_size, cache, on_error, missing)

    def _read_index(self) -> Index:
        value = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "": 0.0,
                 "-1.0": -1.0, "-1": -1.0}
        unc = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[self.uncertain]
        ids, paths, rows, patients, views, split, seen = [], [], [], [], [], [], set()
        for csv_name, part in (("train.csv", "train"), ("valid.csv", "test")):
            csv_path = os.path.join(self.root, csv_name)
            if not os.path.isfile(csv_path):
                if self.split in (part, "all") or (part == "train" and self.split == "val"):
                    raise DataFormatError(f"{csv_path}: file not found")
                continue
            view_col = ["Frontal/Lateral"]
            cols = read_csv(csv_path, ["Path", *self.class_names] + view_col * self.frontal_only,
                            optional=view_col)
            for k, path in enumerate(cols["Path"]):
                view = cols["Frontal/Lateral"][k]
                if self.frontal_only and view != "Frontal":
                    continue
                source = f"{csv_path}: line {k + 2}"
                parts = path.replace("\\", "/").split("/")
                rel = "/".join(parts[1:]) if parts[0] in _RELEASES else path
                if rel in seen:
                    raise DataFormatError(f"{source}: duplicate Path {path!r}")
                seen.add(rel)
                paths.append(safe_join(self.root, rel, source))
                row = []
                for c in self.class_names:
                    v = value.get(cols[c][k])
                    if v is None:
                        raise DataFormatError(f"{source}: {c!r} value {cols[c][k]!r} is not "
                                              f"one of 1.0, 0.0, -1.0 or blank")
                    row.append(unc if v < 0 else v)
                match = _PATIENT.search(rel)
                ids.append(rel)
                rows.append(row)
                patients.append(match.group(1) if match else os.path.dirname(
                    os.path.dirname(rel)))
                views.append(view)
                split.append(part)
        labels = np.array(rows, np.float32).reshape(len(ids), len(self.class_names))
        split = np.array(split, dtype=object)
        train = np.flatnonzero(split == "train")
        if len(train):
            split[train] = assign_groups(
                [patients[j] for j in train],
                {"train": 1 - self.val_fraction, "val": self.val_fraction}, self.seed)
        return Index(ids, paths, labels, split, patients, extra={"views": views})


def _release_root(root) -> str:
    """``root`` itself, or the release folder inside it when ``root`` is its parent."""
    root = os.fspath(root) if root is not None else root
    if root is not None and not os.path.isfile(os.path.join(root, "train.csv")):
        for name in _RELEASES:
            if os.path.isfile(os.path.join(root, name, "train.csv")):
                return os.path.join(root, name)
    return root
