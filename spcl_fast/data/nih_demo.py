"""The built-in demo data: 1,785 real NIH ChestX-ray14 films of 823 patients at 64 px.

``nih_demo.npz`` (in this package, under 8 MB) holds two third-party samples of NIH
ChestX-ray14 (Wang et al., "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on
Weakly-Supervised Classification and Localization of Common Thorax Diseases", CVPR 2017; NIH
Clinical Center, no restrictions on use): 1,000 films already at 64x64 and 785 films at
256x256, downsampled here to 64x64 (Lanczos). No patient is in both. For every film it keeps
the image (uint8), the 14 findings, the patient id, sex, age, view position, the official
split (``train_val`` / ``test``) and the sample it came from. :func:`build_npz` writes the file
from the two samples in the official release layout; ``python -m spcl_fast.data.nih_demo
SOURCE OUT`` runs it.

:class:`NIHDemo` serves the films under the data contract. Its splits are NOT the official
ones: the official test list holds 77 of the 823 patients (9 %), 15 of them giving the
1,000-film sample's 310 test films, too few patients to measure anything on. Instead a fixed
patient-disjoint cut (a keyed hash of the patient id, :func:`~spcl_fast.data.splits.
assign_groups`) puts 30 % of the patients in ``test``, 15 % in ``val`` and the rest in
``train``; ``train`` and ``val`` together are the training patients.

Labels: ``label_set="abnormal"`` (default) is one column, ``Abnormal`` (any finding, against
"No Finding"), the primary endpoint; ``"findings"`` is the 14 findings.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .chestxray14 import CLASS_NAMES
from .splits import assign_groups

FILE = "nih_demo.npz"
SIZE = 64
SOURCES = ("chestxray14-mini", "chestxray14-785")
FRACTIONS = {"train": 0.55, "val": 0.15, "test": 0.30}
LABEL_SETS = ("abnormal", "findings")
# Per-film fields of the file besides the images and findings (str arrays, age int16).
META = ("ids", "patient_ids", "sexes", "ages", "view_positions", "official_split", "source")


def load_arrays(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Every array of the demo file (default: the one in this package), decompressed."""
    source = resources.files(__package__).joinpath(FILE) if path is None else Path(path)
    with source.open("rb") as f, np.load(f, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def split_of(patient_ids, seed: int = 0) -> np.ndarray:
    """The split name (``train``/``val``/``test``) of each film: a patient-disjoint cut of the
    patients by :data:`FRACTIONS`."""
    return assign_groups([str(p) for p in patient_ids], FRACTIONS, seed)


class NIHDemo(Dataset):
    """The embedded NIH films (module docstring) under the data contract.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` (patient-disjoint, :func:`split_of`) or
            ``"all"``.
        image_size: side S of the returned images (64 is the stored size; others are resized
            with antialiasing).
        label_set: ``"abnormal"`` (one column) or ``"findings"`` (the 14 NIH findings).
        seed: which patient-disjoint cut.
        cache: must be ``None`` (the films are in memory; accepted for the common signature).
        on_error: accepted for the common signature (nothing is decoded from files).

    ``ds[i]`` is ``{"image": float32 (1, S, S) in [0, 1], "labels": float32 (C,), "id": str}``;
    ``ds.labels``, ``ds.ids``, ``ds.patient_ids``, ``ds.class_names``, ``ds.findings``
    (float32 (n, 14)), ``ds.sexes``, ``ds.ages``, ``ds.view_positions``, ``ds.official_split``
    and ``ds.source`` (per film).

    Example::

        >>> ds = NIHDemo("test")
        >>> ds[0]["image"].shape, ds.class_names, len(set(ds.patient_ids)) >= 0.25 * 823
        (torch.Size([1, 64, 64]), ('Abnormal',), True)
    """

    name = "nih-demo"
    in_memory = True  # images() is a copy of arrays already loaded (spcl_fast.data.memory)

    def __init__(self, split: str = "train", image_size: int = SIZE, label_set: str = "abnormal",
                 seed: int = 0, cache=None, on_error: str = "raise"):
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"split must be train, val, test or all, got {split!r}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if label_set not in LABEL_SETS:
            raise ValueError(f"label_set must be one of {LABEL_SETS}, got {label_set!r}")
        if cache is not None:
            raise ValueError("nih-demo is held in memory: it takes no cache")
        del on_error  # no files to fail
        arrays = load_arrays()
        keep = np.ones(len(arrays["ids"]), bool) if split == "all" else \
            split_of(arrays["patient_ids"], seed) == split
        self.split, self.image_size, self.seed = split, image_size, seed
        self.findings = torch.from_numpy(arrays["findings"][keep].astype(np.float32))
        abnormal = (self.findings.sum(1, keepdim=True) > 0).float()
        self.class_names = ("Abnormal",) if label_set == "abnormal" else CLASS_NAMES
        self.labels = abnormal if label_set == "abnormal" else self.findings
        for key in META:
            values = arrays[key][keep].tolist()
            setattr(self, key, values)
        self._images = torch.from_numpy(arrays["images"][keep])

    def __len__(self) -> int:
        return len(self.ids)

    def images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Films ``start:stop`` as float32 ``(n, 1, S, S)`` in [0, 1]."""
        x = self._images[start:stop, None].float() / 255.0
        if self.image_size != SIZE:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False).clamp_(0, 1)
        return x

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        return {"image": self.images(index, index + 1)[0], "labels": self.labels[index].clone(),
                "id": self.ids[index]}

    def __repr__(self) -> str:
        return f"NIHDemo(split={self.split!r}, n={len(self)}, image_size={self.image_size})"


def build_npz(source: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """Write the demo file from ``source``, a folder holding the two NIH samples of
    :data:`SOURCES` in the release layout (``Data_Entry_2017.csv``, ``train_val_list.txt``,
    ``test_list.txt``, ``images/``). Returns counts (films, patients, bytes)."""
    from PIL import Image

    from .base import read_csv, read_text

    column = {c: k for k, c in enumerate(CLASS_NAMES)}
    rows = {key: [] for key in (*META, "images", "findings")}
    for name in SOURCES:
        root = os.path.join(source, name)
        cols = read_csv(os.path.join(root, "Data_Entry_2017.csv"),
                        ["Image Index", "Finding Labels", "Patient ID", "Patient Age",
                         "Patient Gender", "View Position"])
        test = set(read_text(os.path.join(root, "test_list.txt")).split())
        for k, image_id in enumerate(cols["Image Index"]):
            with Image.open(os.path.join(root, "images", image_id)) as im:
                im = im.convert("L")
                if im.size != (SIZE, SIZE):
                    im = im.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
                rows["images"].append(np.asarray(im, np.uint8))
            found = np.zeros(len(CLASS_NAMES), np.uint8)
            for token in cols["Finding Labels"][k].split("|"):
                if token != "No Finding":
                    found[column[token]] = 1
            rows["findings"].append(found)
            rows["ids"].append(image_id)
            rows["patient_ids"].append(cols["Patient ID"][k])
            rows["sexes"].append(cols["Patient Gender"][k])
            rows["ages"].append(int(cols["Patient Age"][k].rstrip("Y")))
            rows["view_positions"].append(cols["View Position"][k])
            rows["official_split"].append("test" if image_id in test else "train_val")
            rows["source"].append(name)
    arrays = {k: np.asarray(v, np.int16 if k == "ages" else None) for k, v in rows.items()}
    np.savez_compressed(out, **arrays)
    return {"films": len(arrays["ids"]), "patients": len(set(rows["patient_ids"])),
            "bytes": os.path.getsize(out)}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m spcl_fast.data.nih_demo SOURCE_FOLDER OUT.npz")
    print(build_npz(sys.argv[1], sys.argv[2]))
