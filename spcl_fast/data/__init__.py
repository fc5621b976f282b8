"""Datasets: the built-in synthetic radiographs and the four benchmark sets in their official
layouts, one DICOM reader, and the preprocessing cache.

Every dataset returns ``{"image": float32 (1, S, S) in [0, 1], "labels": float32 (C,),
"id": str}`` (plus ``"mask"`` float32 (1, S, S) for SIIM) and exposes ``labels`` (float32 (n, C),
NaN = unknown, known without decoding), ``ids``, ``class_names`` and ``patient_ids`` (None where
the release has no patient key). Real datasets take ``(root, split, image_size, cache=None)``;
``split`` is ``"train"``, ``"val"``, ``"test"`` or ``"all"``, deterministic and patient-disjoint.

Real images are fitted to ``S x S`` by one policy (long side to S, short side padded black;
:mod:`spcl_fast.data.images`). ``python -m spcl_fast.data.prepare`` decodes a dataset once into
a memory-mapped cache (:mod:`spcl_fast.data.cache`) that datasets read when given ``cache=``.
Bad files raise :class:`ImageReadError` or are skipped and reported (:mod:`spcl_fast.data.base`).
"""

from __future__ import annotations

from .base import CXRDataset
from .cache import CacheReader
from .chestxray14 import ChestXray14
from .chexpert import CheXpert
from .dicom import read_dicom
from .errors import DataFormatError, ImageReadError
from .folder import CXRFolder, CXRPool
from .images import fit_square, read_image
from .memory import TensorImages, group_ids, resident_images
from .nih_demo import NIHDemo
from .rsna import RSNAPneumonia
from .siim import SIIMPneumothorax, rle_decode, rle_encode
from .synthetic import SyntheticCXR
from .transforms import NORMALIZE_MODES, normalize_images

_CLASSES = {
    "chestxray14": ChestXray14,
    "chexpert": CheXpert,
    "rsna": RSNAPneumonia,
    "siim": SIIMPneumothorax,
    "folder": CXRFolder,
}
DATASETS = ("synthetic", "nih-demo", *_CLASSES)


def build_dataset(name: str, root: str | None = None, split: str = "train", image_size: int = 64,
                  **kwargs):
    """Build a dataset by name (one of :data:`DATASETS`) for a split
    (``train``/``val``/``test``/``all``); ``root`` is ignored for ``synthetic``. ``kwargs`` go
    to the class (e.g. ``cache=``, ``on_error="skip"``, ``seed=``, ``uncertain=``).

    Args:
        name: ``"synthetic"``, ``"nih-demo"`` (the embedded NIH films), ``"chestxray14"``,
            ``"chexpert"``, ``"rsna"``, ``"siim"`` or ``"folder"``.
        root: the dataset's folder in its official layout (required except for ``synthetic``
            and ``nih-demo``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (patient-disjoint).
        image_size: side ``S`` of the square images.
        **kwargs: passed to the dataset class (``num_images=`` for ``synthetic``).

    Returns:
        a map-style dataset whose items are ``{"image": float32 (1, S, S) in [0, 1],
        "labels": float32 (C,) (NaN = unknown), "id": str}`` (plus ``"mask"`` for SIIM), with
        ``labels`` float32 ``(n, C)``, ``ids`` and ``class_names``.

    Example::

        >>> ds = build_dataset("synthetic", split="val", image_size=32, num_images=4)
        >>> item = ds[0]
        >>> len(ds), item["image"].shape, item["image"].dtype, item["labels"].shape, item["id"]
        (4, torch.Size([1, 32, 32]), torch.float32, torch.Size([5]), 'synthetic-val-000000')
        >>> ds.labels.shape, ds.class_names[:2]
        (torch.Size([4, 5]), ('cardiomegaly', 'effusion'))
    """
    if name == "synthetic":
        return SyntheticCXR(split=split, image_size=image_size, **kwargs)
    if name == "nih-demo":  # the embedded NIH films: no root
        return NIHDemo(split=split, image_size=image_size, **kwargs)
    if name in _CLASSES:
        if root is None:
            raise ValueError(f"dataset {name!r} needs a root folder (--data-root)")
        return _CLASSES[name](root, split=split, image_size=image_size, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


__all__ = [
    "DATASETS", "NORMALIZE_MODES", "CXRDataset", "CXRFolder", "CXRPool", "CacheReader",
    "CheXpert", "ChestXray14", "DataFormatError", "ImageReadError", "NIHDemo", "RSNAPneumonia",
    "SIIMPneumothorax", "SyntheticCXR", "TensorImages", "build_dataset", "fit_square",
    "group_ids", "normalize_images", "read_dicom", "read_image", "resident_images", "rle_decode",
    "rle_encode",
]
