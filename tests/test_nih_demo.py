"""The embedded NIH demo films: labels, patient ids and metadata as the release's CSVs give
them, patient-disjoint splits, and the dataset name."""

from __future__ import annotations

import csv
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from spcl_fast.data import DATASETS, NIHDemo, build_dataset
from spcl_fast.data.chestxray14 import CLASS_NAMES
from spcl_fast.data.nih_demo import FILE, SOURCES, build_npz, load_arrays

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not all((SHARED / s).is_dir() for s in SOURCES),
                                  reason="../shared/data (the NIH samples) is absent")


def test_file_is_small_and_complete():
    path = resources.files("spcl_fast.data").joinpath(FILE)
    assert path.is_file() and os.path.getsize(path) <= 8 * 2**20
    arrays = load_arrays()
    n = len(arrays["ids"])
    assert arrays["images"].shape == (n, 64, 64) and arrays["images"].dtype == np.uint8
    assert arrays["findings"].shape == (n, len(CLASS_NAMES))
    assert (n, len(set(arrays["patient_ids"].tolist()))) == (1785, 823)
    assert len(set(arrays["ids"].tolist())) == n


def test_splits_are_patient_disjoint_with_a_quarter_in_test():
    parts = {s: NIHDemo(s) for s in ("train", "val", "test")}
    patients = {s: set(ds.patient_ids) for s, ds in parts.items()}
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
    assert not patients["train"] & patients["val"]
    assert sum(len(ds) for ds in parts.values()) == 1785
    assert len(patients["test"]) >= 823 / 4
    everything = NIHDemo("all", label_set="findings")
    assert everything.labels.shape == (1785, 14)
    assert torch.equal(NIHDemo("all").labels[:, 0], (everything.labels.sum(1) > 0).float())


def test_items_follow_the_data_contract():
    ds = build_dataset("nih-demo", None, "val", 32)
    item = ds[len(ds) - 1]
    assert "nih-demo" in DATASETS and item["image"].shape == (1, 32, 32)
    assert item["image"].dtype == torch.float32 and 0 <= item["image"].min() <= 1
    assert item["id"] == ds.ids[-1] and torch.equal(item["labels"], ds.labels[-1])
    with pytest.raises(ValueError, match="label_set"):
        NIHDemo("val", label_set="pneumonia")
    with pytest.raises(ValueError, match="cache"):
        NIHDemo("val", cache="somewhere")


def _csv_rows(name: str) -> list[dict]:
    with open(SHARED / name / "Data_Entry_2017.csv", newline="") as f:
        return list(csv.DictReader(f))


@needs_shared
def test_labels_patients_and_metadata_match_the_csvs():
    arrays = load_arrays()
    row_of = {i: k for k, i in enumerate(arrays["ids"].tolist())}
    rows = [r for s in SOURCES for r in _csv_rows(s)]
    assert len(rows) == len(row_of) == 1785
    assert len({r["Patient ID"] for r in rows}) == 823
    normal = sum(r["Finding Labels"] == "No Finding" for r in rows)
    assert normal == int((arrays["findings"].sum(1) == 0).sum())
    for r in rows:
        k = row_of[r["Image Index"]]
        found = {CLASS_NAMES[c] for c in np.flatnonzero(arrays["findings"][k])}
        assert found == set(r["Finding Labels"].split("|")) - {"No Finding"}
        assert arrays["patient_ids"][k] == r["Patient ID"]
        assert arrays["sexes"][k] == r["Patient Gender"]
        assert arrays["ages"][k] == int(r["Patient Age"])
        assert arrays["view_positions"][k] == r["View Position"]
    for s in SOURCES:
        test = set((SHARED / s / "test_list.txt").read_text().split())
        ours = {i for i, o, src in zip(arrays["ids"], arrays["official_split"],
                                       arrays["source"], strict=True) if o == "test" and src == s}
        assert ours == test


@needs_shared
def test_embedded_file_is_what_the_builder_writes(tmp_path):
    counts = build_npz(SHARED, tmp_path / "rebuilt.npz")
    assert (counts["films"], counts["patients"]) == (1785, 823)
    rebuilt, embedded = load_arrays(tmp_path / "rebuilt.npz"), load_arrays()
    assert rebuilt.keys() == embedded.keys()
    for key in embedded:
        np.testing.assert_array_equal(rebuilt[key], embedded[key], err_msg=key)


def test_training_on_nih_demo_ends_with_the_patient_probe(tmp_path, capsys):
    from spcl_fast.train.__main__ import main

    summary = main(["--preset", "smoke", "--dataset", "nih-demo", "--num-images", "128",
                    "--probe", "true", "--out", str(tmp_path / "run")])
    probe = summary["patient_probe"]
    assert list(probe["auroc"]) == ["pretrained", "init", "raw_pixels"]
    assert probe["test_patients"] == len(set(NIHDemo("test").patient_ids))
    assert probe["train_films"] == 128 + len(NIHDemo("val"))
    out = capsys.readouterr().out
    assert "nih-demo Abnormal AUROC by patient" in out and "pre-trained - raw pixels" in out
