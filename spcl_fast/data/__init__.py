"""Datasets: the built-in synthetic radiographs and (through ``build_dataset``) real CXR sets.

Every dataset returns ``{"image": float32 (1, S, S), "labels": float32 (C,), "id": str}`` and
exposes ``labels`` (n, C), ``ids`` and ``class_names``.
"""

from __future__ import annotations

from .synthetic import SyntheticCXR
from .transforms import NORMALIZE_MODES, normalize_images

DATASETS = ("synthetic",)


def build_dataset(name: str, root: str | None = None, split: str = "train", image_size: int = 64,
                  **kwargs):
    """Build a dataset by name for a split (``train``/``val``/``test``/``all``)."""
    if name == "synthetic":
        return SyntheticCXR(split=split, image_size=image_size, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


__all__ = ["DATASETS", "NORMALIZE_MODES", "SyntheticCXR", "build_dataset", "normalize_images"]
