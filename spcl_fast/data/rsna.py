"""RSNA Pneumonia Detection Challenge (Kaggle, 2018) in its official layout.

::

    root/
      stage_2_train_labels.csv     patientId,x,y,width,height,Target (stage_1_* also read)
      stage_2_train_images/<patientId>.dcm

One row per box, several rows for a positive image, one row with empty box and Target 0 for a
negative one. Each image (``patientId``, one image per patient in this release) gets one binary
label, ``Pneumonia`` = any Target 1, and its boxes. Only the train images are labelled, so the
splits are a 70/15/15 patient cut of them (``fractions``, ``seed``;
:func:`~spcl_fast.data.splits.assign_groups`). Images are 1024 x 1024 8-bit MONOCHROME2 DICOM,
decoded by :func:`~spcl_fast.data.dicom.read_dicom`.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .base import CXRDataset, Index, read_csv
from .errors import DataFormatError, ImageReadError
from .images import square_transform
from .splits import assign_groups

CLASS_NAMES = ("Pneumonia",)
_STAGES = ("stage_2", "stage_1")


def _dicom_size(path: str) -> tuple[int, int]:
    """``(Rows, Columns)`` from a DICOM header, reading nothing else."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read Rows/Columns ({type(exc).__name__})") from exc


class RSNAPneumonia(CXRDataset):
    """RSNA pneumonia: one label (``Pneumonia``) and opacity boxes per image.

    Args:
        root: folder in the official layout (module docstring).
        split: ``"train"``, ``"val"``, ``"test"`` (the 70/15/15 patient cut) or ``"all"``.
        image_size: side S of the returned square images.
        cache: a folder from ``python -m spcl_fast.data.prepare --dataset rsna``.
        fractions: (train, val, test) shares of the patients.
        seed: which patient cut.
        on_error, missing: bad-file policy (:mod:`spcl_fast.data.base`).

    ``ds[i]`` is ``{"image": float32 (1, S, S), "labels": float32 (1,), "id": patientId}``.
    ``ds.boxes[i]`` is float32 ``(k, 4)`` ``(x, y, width, height)`` in source pixels as in the
    CSV (k = 0 for negatives); ``ds.image_boxes(i)`` gives them as ``(x0, y0, x1, y1)`` in the
    returned ``S x S`` image.

    Example::

        >>> import tempfile
        >>> from devtools.fixtures import make_rsna
        >>> ds = RSNAPneumonia(make_rsna(tempfile.mkdtemp(), n=6, size=32), "all", 64)
        >>> ds[0]["image"].shape, ds.labels[:, 0].tolist(), ds.boxes[0].shape
        (torch.Size([1, 64, 64]), [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], (1, 4))
        >>> ds.image_boxes(0).tolist()  # (x0, y0, x1, y1) at 64 = 2x the 32-pixel source
        [[4.0, 6.0, 20.0, 26.0]]
    """

    class_names = CLASS_NAMES
    name = "rsna"

    def __init__(self, root, split="train", image_size=224, cache=None,
                 fractions=(0.7, 0.15, 0.15), seed=0, on_error="raise", missing="skip"):
        if len(fractions) != 3:
            raise ValueError(f"fractions must be (train, val, test), got {fractions!r}")
        self.fractions, self.seed = tuple(float(f) for f in fractions), seed
        super().__init__(root, split, image_size, cache, on_error, missing)

    def _read_index(self) -> Index:
        stage = next((s for s in _STAGES
                      if os.path.isfile(os.path.join(self.root, f"{s}_train_labels.csv"))), None)
        if stage is None:
            raise DataFormatError(f"{self.root}: no stage_2_train_labels.csv")
        csv_path = os.path.join(self.root, f"{stage}_train_labels.csv")
        image_dir = os.path.join(self.root, f"{stage}_train_images")
        cols = read_csv(csv_path, ["patientId", "x", "y", "width", "height", "Target"])
        order, target, boxes = [], {}, {}
        for k, pid in enumerate(cols["patientId"]):
            source = f"{csv_path}: line {k + 2}"
            if not pid or "/" in pid or "\\" in pid or pid in (".", ".."):
                raise DataFormatError(f"{source}: patientId {pid!r} is not a file name")
            t = cols["Target"][k]
            if t not in ("0", "1"):
                raise DataFormatError(f"{source}: Target {t!r} is not 0 or 1")
            if pid not in target:
                order.append(pid)
                target[pid], boxes[pid] = 0.0, []
            if t == "1":
                target[pid] = 1.0
                try:
                    box = [float(cols[c][k]) for c in ("x", "y", "width", "height")]
                except ValueError as exc:
                    raise DataFormatError(f"{source}: positive row without a numeric box") from exc
                if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
                    raise DataFormatError(f"{source}: invalid box {box}")
                boxes[pid].append(box)
        labels = np.array([[target[p]] for p in order], np.float32).reshape(len(order), 1)
        split = assign_groups(order, dict(zip(("train", "val", "test"), self.fractions,
                                              strict=True)), self.seed)
        paths = [os.path.join(image_dir, f"{p}.dcm") for p in order]
        box_arrays = [np.array(boxes[p], np.float32).reshape(-1, 4) for p in order]
        return Index(order, paths, labels, split, list(order), extra={"boxes": box_arrays})

    def image_boxes(self, i: int) -> np.ndarray:
        """Boxes of item ``i`` as float32 ``(k, 4)`` ``(x0, y0, x1, y1)`` in the ``S x S``
        image that ``ds[i]`` returns (source size from the cache, or the DICOM header)."""
        if self.cache is not None:
            h, w = (int(v) for v in self.cache.hw[self._cache_pos[i]])
        else:
            h, w = _dicom_size(self.paths[i])
        s, dx, dy = square_transform(h, w, self.image_size)
        b = self.boxes[i]
        return np.stack([b[:, 0] * s + dx, b[:, 1] * s + dy, (b[:, 0] + b[:, 2]) * s + dx,
                         (b[:, 1] + b[:, 3]) * s + dy], axis=1).astype(np.float32)
