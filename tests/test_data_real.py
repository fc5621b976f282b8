"""The loaders on the real samples in ``../shared/data`` (NIH PNGs at 64x64 with the real CSV,
one real SIIM JPEG-baseline DICOM). A fresh clone has no such folder: these tests then skip."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIH = SHARED / "chestxray14-mini"
SIIM = SHARED / "siim-one"

pytestmark = pytest.mark.skipif(not NIH.is_dir() or not SIIM.is_dir(),
                                reason="real samples not present (../shared/data)")

# Label counts of the 1000 images, from the samples' README.
README_COUNTS = {
    "Effusion": 170, "Infiltration": 162, "Atelectasis": 95, "Cardiomegaly": 83,
    "Consolidation": 42, "Pneumothorax": 40, "Nodule": 39, "Emphysema": 37, "Mass": 35,
    "Fibrosis": 32, "Edema": 31, "Pleural_Thickening": 29, "Pneumonia": 11, "Hernia": 9,
}


def test_chestxray14_mini(tmp_path):
    from spcl_fast.data import ChestXray14
    from spcl_fast.data.prepare import prepare

    ds = ChestXray14(NIH, "all", 64)
    assert len(ds) == 1000 and not ds.skipped
    assert dict(zip(ds.class_names, ds.labels.sum(0).int().tolist(), strict=True)) == README_COUNTS
    assert int((ds.labels.sum(1) == 0).sum()) == 499  # No Finding
    parts = {s: ChestXray14(NIH, s, 64) for s in ("train", "val", "test")}
    assert len(parts["train"]) + len(parts["val"]) == 690 and len(parts["test"]) == 310
    pids = [set(p.patient_ids) for p in parts.values()]
    assert not (pids[0] & pids[1] or pids[0] & pids[2] or pids[1] & pids[2])
    item = ds[0]
    assert item["id"] == "00000001_000.png" and item["image"].shape == (1, 64, 64)
    assert 0 <= item["image"].min() and item["image"].max() <= 1 and item["image"].std() > 0.05
    out = tmp_path / "cache"
    report = prepare("chestxray14", NIH, out, 64, workers=2, progress=False)
    assert report["complete"] and report["num_failed"] == 0
    cached = ChestXray14(NIH, "test", 64, cache=str(out))
    assert cached.ids == parts["test"].ids
    diff = (cached.images(0, 20) - parts["test"].images(0, 20)).abs().max()
    assert diff <= 0.5 / 255 + 1e-6


def test_siim_one():
    from spcl_fast.data import SIIMPneumothorax, read_dicom

    ds = SIIMPneumothorax(SIIM, "all", 256)
    assert len(ds) == 1 and ds.labels.tolist() == [[0.0]]
    item = ds[0]
    assert item["image"].shape == (1, 256, 256) and item["mask"].sum() == 0
    assert 0.3 < float(item["image"].mean()) < 0.8
    path = glob.glob(os.path.join(SIIM, "dicom-images-train", "*", "*", "*.dcm"))[0]
    img = read_dicom(path)
    assert img.shape == (1024, 1024)
    for plugin in ("pylibjpeg", "pillow"):  # two JPEG decoders agree
        assert np.abs(read_dicom(path, plugin=plugin) - img).mean() < 2 / 255
    assert torch.isfinite(item["image"]).all()
