"""SIIM-ACR Pneumothorax Segmentation (Kaggle, 2019) in its official layout, with masks.

::

    root/
      train-rle.csv          header "ImageId, EncodedPixels" (note the space); stage_2_train.csv
                             is read when train-rle.csv is absent
      dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm

Each ``ImageId`` has one or more rows; ``-1`` means no pneumothorax. Label ``Pneumothorax`` = any
row other than ``-1``; the mask is the union of all rows' run-length encodings.

RLE (:func:`rle_decode`): column-major (down the columns, left to right), pairs of
``start length``. The competition's ``train-rle.csv`` uses RELATIVE starts (each start counts
from the end of the previous run, the first from pixel 0); the stage-2 files use the usual
Kaggle ABSOLUTE, 1-based starts. ``fmt="auto"`` tells them apart: a string is absolute when it
has at least two runs and its starts are increasing and non-overlapping read as absolute
positions (relative starts after the first are gaps, far smaller than the previous run's
end), or when it only fits the image read as absolute; otherwise relative. A one-run string
fits both readings, which differ by one pixel; it is read as relative.

The release has no patient key (each DICOM carries its own anonymised PatientID, and reading
headers to group them is not done), so ``patient_ids`` is None and the 70/15/15 split
(``fractions``, ``seed``) is by image. ImageIds listed in the CSV whose DICOM is absent are
skipped and reported (``missing="skip"``).
"""

from __future__ import annotations

import os

import numpy as np

from .base import CXRDataset, Index, read_csv
from .errors import DataFormatError, ImageReadError
from .splits import assign_groups

CLASS_NAMES = ("Pneumothorax",)
CSV_NAMES = ("train-rle.csv", "stage_2_train.csv")


def _parse(rle: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.array(rle.split(), dtype=np.int64)
    if len(values) % 2 or (values < 0).any() or (values[1::2] <= 0).any():
        raise ValueError("RLE must be pairs of non-negative starts and positive lengths")
    return values[0::2], values[1::2]


def rle_format(rle: str, height: int, width: int) -> str:
    """``"relative"`` or ``"absolute"`` for an RLE string (rules in the module docstring)."""
    starts, lengths = _parse(rle)
    n = height * width
    absolute_ok = (len(starts) > 0 and starts[0] >= 1 and starts[-1] + lengths[-1] - 1 <= n
                   and bool((starts[1:] >= starts[:-1] + lengths[:-1]).all()))
    relative_ok = int(starts.sum() + lengths.sum()) <= n
    if absolute_ok and (len(starts) >= 2 or not relative_ok):
        return "absolute"
    return "relative"


def rle_decode(rle: str, height: int, width: int, fmt: str = "auto") -> np.ndarray:
    """Decode one SIIM run-length string to a uint8 ``(height, width)`` 0/1 mask.

    Args:
        rle: ``"start length start length ..."``; ``"-1"`` or ``""`` is an empty mask.
        fmt: ``"relative"`` (train-rle.csv), ``"absolute"`` (1-based, stage 2) or ``"auto"``.

    Raises ``ValueError`` for malformed strings and runs outside the image.

    Example::

        >>> rle_decode("1 2 2 1", 3, 2).tolist()    # relative: pixels 1, 2 and 5 (0-based)
        [[0, 0], [1, 0], [1, 1]]
        >>> rle_decode("2 2 6 1", 3, 2, "absolute").tolist()  # the same mask, absolute
        [[0, 0], [1, 0], [1, 1]]
    """
    flat = np.zeros(height * width, np.uint8)
    rle = rle.strip()
    if rle in ("", "-1"):
        return flat.reshape(width, height).T
    if fmt == "auto":
        fmt = rle_format(rle, height, width)
    starts, lengths = _parse(rle)
    if fmt == "relative":
        begin = np.cumsum(starts) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    elif fmt == "absolute":
        begin = starts - 1
    else:
        raise ValueError(f"fmt must be 'auto', 'relative' or 'absolute', got {fmt!r}")
    if (begin < 0).any() or int((begin + lengths).max()) > flat.size:
        raise ValueError(f"{fmt} RLE runs outside a {height}x{width} image")
    for b, n in zip(begin.tolist(), lengths.tolist(), strict=True):
        flat[b:b + n] = 1
    return flat.reshape(width, height).T  # column-major: pixel (y, x) is flat[x * H + y]


def rle_encode(mask: np.ndarray, fmt: str = "relative") -> str:
    """Inverse of :func:`rle_decode` for a 2-D 0/1 mask (``"-1"`` when empty)."""
    flat = np.asarray(mask).T.reshape(-1).astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.astype(np.int8), [0]])))
    begin, end = edges[0::2], edges[1::2]
    if not len(begin):
        return "-1"
    lengths = end - begin
    if fmt == "absolute":
        starts = begin + 1
    elif fmt == "relative":
        starts = begin - np.concatenate([[0], end[:-1]])
    else:
        raise ValueError(f"fmt must be 'relative' or 'absolute', got {fmt!r}")
    return " ".join(f"{s} {n}" for s, n in zip(starts.tolist(), lengths.tolist(), strict=True))


class SIIMPneumothorax(CXRDataset):
    """SIIM-ACR pneumothorax: one label and a full-resolution mask per image.

    Args:
        root: folder in the official layout (module docstring).
        split: ``"train"``, ``"val"``, ``"test"`` (70/15/15 by image) or ``"all"``.
        image_size: side S of the returned square images and masks.
        cache: a folder from ``python -m spcl_fast.data.prepare --dataset siim`` (holds masks).
        rle_format: ``"auto"``, ``"relative"`` or ``"absolute"`` (module docstring).
        fractions, seed: the split.
        on_error, missing: bad-file policy (:mod:`spcl_fast.data.base`); an RLE that runs
            outside its image is an ``ImageReadError`` of that item.

    ``ds[i]`` is ``{"image": float32 (1, S, S), "mask": float32 (1, S, S) of 0/1,
    "labels": float32 (1,), "id": ImageId}``; ``ds.rles[i]`` the item's RLE strings.

    Example::

        >>> import tempfile
        >>> from devtools.fixtures import make_siim
        >>> ds = SIIMPneumothorax(make_siim(tempfile.mkdtemp(), n=4, size=32), "all", 32)
        >>> item = ds[1]
        >>> item["mask"].shape, float(item["mask"].sum()), ds.labels[:, 0].tolist()
        (torch.Size([1, 32, 32]), 84.0, [0.0, 1.0, 0.0, 1.0])
    """

    class_names = CLASS_NAMES
    has_mask = True
    name = "siim"

    def __init__(self, root, split="train", image_size=224, cache=None, rle_format="auto",
                 fractions=(0.7, 0.15, 0.15), seed=0, on_error="raise", missing="skip"):
        if rle_format not in ("auto", "relative", "absolute"):
            raise ValueError(f"rle_format must be auto, relative or absolute: {rle_format!r}")
        if len(fractions) != 3:
            raise ValueError(f"fractions must be (train, val, test), got {fractions!r}")
        self.rle_format = rle_format
        self.fractions, self.seed = tuple(float(f) for f in fractions), seed
        super().__init__(root, split, image_size, cache, on_error, missing)

    def _read_index(self) -> Index:
        csv_path = next((os.path.join(self.root, n) for n in CSV_NAMES
                         if os.path.isfile(os.path.join(self.root, n))), None)
        if csv_path is None:
            raise DataFormatError(f"{self.root}: no {' or '.join(CSV_NAMES)}")
        cols = read_csv(csv_path, ["ImageId", "EncodedPixels"])
        order, rles = [], {}
        for k, (image_id, rle) in enumerate(zip(cols["ImageId"], cols["EncodedPixels"],
                                                strict=True)):
            source = f"{csv_path}: line {k + 2}"
            if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", ".."):
                raise DataFormatError(f"{source}: ImageId {image_id!r} is not a file name")
            if rle != "-1":
                try:
                    _parse(rle)
                except ValueError as exc:
                    raise DataFormatError(f"{source}: malformed EncodedPixels ({exc})") from exc
            if image_id not in rles:
                order.append(image_id)
                rles[image_id] = []
            if rle != "-1":
                rles[image_id].append(rle)
        where = {}
        image_root = os.path.join(self.root, "dicom-images-train")
        for folder, _, files in os.walk(image_root):
            for f in files:
                if f.endswith(".dcm"):
                    where.setdefault(f[:-4], os.path.join(folder, f))
        paths = [where.get(i, os.path.join(image_root, f"{i}.dcm")) for i in order]
        labels = np.array([[1.0 if rles[i] else 0.0] for i in order], np.float32)
        split = assign_groups(order, dict(zip(("train", "val", "test"), self.fractions,
                                              strict=True)), self.seed)
        return Index(order, paths, labels.reshape(len(order), 1), split, None,
                     extra={"rles": [rles[i] for i in order]})

    def _mask(self, j: int, hw: tuple[int, int]) -> np.ndarray:
        mask = np.zeros(hw, np.uint8)
        for rle in self.rles[j]:
            try:
                mask |= rle_decode(rle, hw[0], hw[1], self.rle_format)
            except ValueError as exc:
                raise ImageReadError(f"{self.paths[j]}: mask does not fit the image "
                                     f"({exc})") from exc
        return mask
