"""The four benchmark datasets and the folder/pool datasets on tiny fixtures written in their
official layouts (``devtools.fixtures``): the item contract, splits, labels, masks,
boxes, and every kind of bad metadata or bad file."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom")

from devtools.fixtures import (  # noqa: E402
    make_chestxray14,
    make_chexpert,
    make_rsna,
    make_siim,
    phantoms,
    write_dicom,
)
from spcl_fast.data import (  # noqa: E402
    ChestXray14,
    CheXpert,
    CXRFolder,
    CXRPool,
    DataFormatError,
    ImageReadError,
    RSNAPneumonia,
    SIIMPneumothorax,
    build_dataset,
    rle_decode,
    rle_encode,
)
from spcl_fast.data import base as data_base  # noqa: E402
from spcl_fast.data.siim import rle_format  # noqa: E402

S = 32


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("datasets")
    return {
        "chestxray14": make_chestxray14(base / "nih", n=24, size=S),
        "chexpert": make_chexpert(base / "chexpert", n_train=16, n_valid=4, size=S),
        "rsna": make_rsna(base / "rsna", n=20, size=S),
        "siim": make_siim(base / "siim", n=12, size=S),
    }


def _copy(root, tmp_path) -> str:
    dest = tmp_path / os.path.basename(root)
    shutil.copytree(root, dest)
    return str(dest)


# ---------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", ["chestxray14", "chexpert", "rsna", "siim"])
def test_item_contract_and_splits(roots, name):
    ds_all = build_dataset(name, roots[name], "all", S)
    parts = {s: build_dataset(name, roots[name], s, S) for s in ("train", "val", "test")}
    assert all(len(p) for p in parts.values())
    assert sorted(i for p in parts.values() for i in p.ids) == sorted(ds_all.ids)
    if ds_all.patient_ids is not None:  # patient-disjoint
        sets = [set(p.patient_ids) for p in parts.values()]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    again = build_dataset(name, roots[name], "train", S)
    assert again.ids == parts["train"].ids  # deterministic
    ds = parts["train"]
    assert len(set(ds.ids)) == len(ds) and isinstance(ds.ids[0], str)
    assert ds.labels.dtype == torch.float32 and ds.labels.shape == (len(ds), len(ds.class_names))
    for i in (0, len(ds) - 1):
        item = ds[i]
        assert item["id"] == ds.ids[i]
        assert item["image"].shape == (1, S, S) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1 and item["image"].std() > 0
        torch.testing.assert_close(item["labels"], ds.labels[i], equal_nan=True)
        if name == "siim":
            assert item["mask"].shape == (1, S, S) and item["mask"].dtype == torch.float32
    assert ds.images(0, 3).shape == (3, 1, S, S)
    assert type(ds) is type(build_dataset(name, roots[name], "val", S, seed=0))


def test_labels_need_no_decoding(roots, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("decoded an image")

    monkeypatch.setattr(data_base, "load_square", boom)
    for name, root in roots.items():
        ds = build_dataset(name, root, "all", S)
        assert ds.labels.shape[0] == len(ds) > 0


def test_build_dataset_names():
    from spcl_fast.data import DATASETS

    assert set(DATASETS) == {"synthetic", "nih-demo", "chestxray14", "chexpert", "rsna", "siim",
                             "folder"}
    assert len(build_dataset("synthetic", None, "val", 32, num_images=2)) == 2
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("rsna", None)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mnist", "x")


# ---------------------------------------------------------------- ChestX-ray14


def test_chestxray14_labels_and_official_split(roots):
    root = roots["chestxray14"]
    ds = ChestXray14(root, "all", S)
    assert ds.class_names[:3] == ("Atelectasis", "Cardiomegaly", "Effusion")
    rows = [line.split(",") for line in open(os.path.join(root, "Data_Entry_2017.csv"))][1:]
    for name, findings in ((r[0], r[1]) for r in rows):
        j = ds.ids.index(name)
        want = {f for f in findings.split("|") if f != "No Finding"}
        assert {c for c, v in zip(ds.class_names, ds.labels[j], strict=True) if v} == want
    test = set(open(os.path.join(root, "test_list.txt")).read().split())
    assert set(ChestXray14(root, "test", S).ids) == test
    assert ChestXray14(root, "train", S, val_fraction=0.0).ids and not ChestXray14(
        root, "val", S, val_fraction=0.0).ids
    assert ds.view_positions[0] == "PA" and set(ds.sexes) <= {"M", "F"}


def test_chestxray14_release_variants(roots, tmp_path):
    root = _copy(roots["chestxray14"], tmp_path)
    # The v2020 file (no trailing column, plain ages) wins over the 2017 one; Kaggle layout.
    lines = open(os.path.join(root, "Data_Entry_2017.csv")).read().splitlines()
    v2020 = [lines[0].rstrip(",")] + [ln.rstrip(",").replace("Y,M", ",M").replace(",0", ",", 1)
                                      for ln in lines[1:]]
    with open(os.path.join(root, "Data_Entry_2017_v2020.csv"), "w") as f:
        f.write("\n".join(v2020[:-2]) + "\n")
    os.makedirs(os.path.join(root, "images_001"))
    shutil.move(os.path.join(root, "images"), os.path.join(root, "images_001", "images"))
    ds = ChestXray14(root, "all", S)
    assert len(ds) == len(v2020) - 3 and not ds.skipped
    assert ds[0]["image"].shape == (1, S, S)


def test_chestxray14_bad_metadata(roots, tmp_path):
    root = _copy(roots["chestxray14"], tmp_path)
    csv = os.path.join(root, "Data_Entry_2017.csv")
    text = open(csv).read()
    with open(csv, "w") as f:
        f.write(text.replace("Finding Labels", "Findings", 1))
    with pytest.raises(DataFormatError, match=r"Data_Entry_2017.csv: missing column 'Finding"):
        ChestXray14(root, "all", S)
    lines = text.splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "Cardiomegaly|Dragon", 1)
    with open(csv, "w") as f:
        f.write("\n".join(lines))
    with pytest.raises(DataFormatError, match="line 4: unknown finding 'Dragon'"):
        ChestXray14(root, "all", S)
    lines = text.splitlines()
    lines[2] = "../../etc/passwd" + lines[2][lines[2].index(","):]
    with open(csv, "w") as f:
        f.write("\n".join(lines))
    with pytest.raises(DataFormatError, match="not a file name"):
        ChestXray14(root, "all", S)
    with open(csv, "w") as f:
        f.write(text)
    os.remove(os.path.join(root, "test_list.txt"))
    with pytest.raises(DataFormatError, match="test_list.txt"):
        ChestXray14(root, "train", S)
    assert len(ChestXray14(root, "all", S)) == 24


def test_metadata_that_is_not_utf8_or_not_csv(roots, tmp_path):
    """Found by the fuzz campaign: non-UTF-8 bytes raised UnicodeDecodeError (no file named)."""
    root = _copy(roots["chestxray14"], tmp_path)
    csv = os.path.join(root, "Data_Entry_2017.csv")
    text = open(csv, "rb").read()
    for name, data, message in [
        ("Data_Entry_2017.csv", text.replace(b"No Finding", b"No Find\xe9ng", 1),
         r"Data_Entry_2017.csv: not UTF-8 text \(byte \d+ is b'\\xe9'\)"),
        ("Data_Entry_2017.csv", text.replace(b"No Finding", b"x" * 200_000, 1),
         r"Data_Entry_2017.csv: line \d+: field larger than field limit"),
        ("test_list.txt", b"\xff\xfe" + open(os.path.join(root, "test_list.txt"), "rb").read(),
         r"test_list.txt: not UTF-8 text \(byte 0"),
    ]:
        path = os.path.join(root, name)
        original = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(DataFormatError, match=message):
            ChestXray14(root, "all" if name.endswith(".csv") else "train", S)
        with open(path, "wb") as f:
            f.write(original)
    # What every CSV reader accepts still reads the same: a BOM, CRLF line ends, quoting.
    with open(csv, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n"))
    assert ChestXray14(root, "all", S).ids == ChestXray14(roots["chestxray14"], "all", S).ids


# ---------------------------------------------------------------- CheXpert


def test_chexpert_labels_views_and_paths(roots, tmp_path):
    root = roots["chexpert"]
    rows = [ln.split(",") for ln in open(os.path.join(root, "train.csv")).read().splitlines()]
    header, rows = rows[0], rows[1:]
    ignore = CheXpert(root, "all", S, frontal_only=False, classes="all")
    assert len(ignore.class_names) == 14 and len(ignore) == 20
    ones = CheXpert(root, "all", S, frontal_only=False, classes="all", uncertain="ones")
    zeros = CheXpert(root, "all", S, frontal_only=False, classes="all", uncertain="zeros")
    for row in rows:
        j = ignore.ids.index(row[0].split("/", 1)[1])
        for c, name in enumerate(ignore.class_names):
            raw = row[header.index(name)]
            want = {"1.0": 1.0, "0.0": 0.0, "": 0.0}.get(raw)
            if raw == "-1.0":
                assert torch.isnan(ignore.labels[j, c]) and ones.labels[j, c] == 1
                assert zeros.labels[j, c] == 0
            else:
                assert ignore.labels[j, c] == want
    frontal = CheXpert(root, "all", S)
    assert frontal.class_names == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                   "Pleural Effusion")
    assert len(frontal) < len(ignore) and set(frontal.views) == {"Frontal"}
    test = CheXpert(root, "test", S)
    assert all(i.startswith("valid/") for i in test.ids) and not torch.isnan(test.labels).any()
    assert frontal.ids[0].startswith("train/patient") and frontal.patient_ids[0] == "patient00001"
    parent = tmp_path / "parent"
    os.makedirs(parent)
    os.symlink(root, parent / "CheXpert-v1.0-small")
    assert CheXpert(str(parent), "all", S).ids == frontal.ids


def test_chexpert_paths_escaping_root(roots, tmp_path):
    root = _copy(roots["chexpert"], tmp_path)
    csv = os.path.join(root, "valid.csv")
    lines = open(csv).read().splitlines()
    for bad in ("CheXpert-v1.0-small/../../secret.jpg", "/etc/passwd"):
        lines[1] = bad + lines[1][lines[1].index(","):]
        with open(csv, "w") as f:
            f.write("\n".join(lines))
        with pytest.raises(DataFormatError, match="escapes the dataset root"):
            CheXpert(root, "test", S)
    lines[1] = lines[1].replace(lines[1].split(",")[5], "maybe", 1)
    lines[1] = "CheXpert-v1.0-small/valid/x.jpg" + lines[1][lines[1].index(","):]
    with open(csv, "w") as f:
        f.write("\n".join(lines))
    with pytest.raises(DataFormatError, match="valid.csv: line 2"):
        CheXpert(root, "test", S, classes="all")


def test_chexpert_duplicate_paths(roots, tmp_path):
    """Found by the fuzz campaign: a repeated Path row gave two items with one id."""
    root = _copy(roots["chexpert"], tmp_path)
    csv = os.path.join(root, "valid.csv")
    lines = open(csv).read().splitlines()
    with open(csv, "w") as f:
        f.write("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DataFormatError, match=f"valid.csv: line {len(lines) + 1}: duplicate Path"):
        CheXpert(root, "test", S)


# ---------------------------------------------------------------- RSNA


def test_rsna_labels_and_boxes(roots):
    root = roots["rsna"]
    ds = RSNAPneumonia(root, "all", S)
    assert len(ds) == 20 and ds.class_names == ("Pneumonia",)
    positives = [j for j in range(len(ds)) if ds.labels[j, 0] == 1]
    assert len(positives) == 7 and all(len(ds.boxes[j]) >= 1 for j in positives)
    assert all(len(ds.boxes[j]) == 0 for j in range(len(ds)) if j not in positives)
    j = next(j for j in positives if len(ds.boxes[j]) == 2)
    x, y, w, h = ds.boxes[j][0]
    np.testing.assert_allclose(ds.image_boxes(j)[0], [x, y, x + w, y + h])  # S = source size
    half = RSNAPneumonia(root, "all", S // 2)
    np.testing.assert_allclose(half.image_boxes(j)[0], [x / 2, y / 2, (x + w) / 2, (y + h) / 2])
    assert ds.patient_ids == ds.ids
    sizes = [len(RSNAPneumonia(root, s, S)) for s in ("train", "val", "test")]
    assert sizes == [14, 3, 3]
    other = RSNAPneumonia(root, "train", S, seed=1)
    assert set(other.ids) != set(RSNAPneumonia(root, "train", S).ids)


def test_rsna_bad_target(roots, tmp_path):
    root = _copy(roots["rsna"], tmp_path)
    csv = os.path.join(root, "stage_2_train_labels.csv")
    lines = open(csv).read().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",yes"
    with open(csv, "w") as f:
        f.write("\n".join(lines))
    with pytest.raises(DataFormatError, match="line 3: Target 'yes'"):
        RSNAPneumonia(root, "all", S)


# ---------------------------------------------------------------- SIIM


@pytest.mark.parametrize("fmt", ["relative", "absolute"])
def test_siim_masks(tmp_path, fmt):
    root = make_siim(tmp_path / fmt, n=6, size=S, fmt=fmt)
    truth = np.load(os.path.join(root, "masks.npy"))
    ds = SIIMPneumothorax(root, "all", S)
    assert ds.patient_ids is None and len(ds) == 6
    for j in range(len(ds)):
        item = ds[j]
        np.testing.assert_array_equal(item["mask"][0].numpy(), truth[j])
        assert item["labels"][0] == float(truth[j].any())
        assert len(ds.rles[j]) == (2 if truth[j].any() else 0)


def test_rle_round_trip_and_format_detection():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = int(rng.integers(4, 40)), int(rng.integers(4, 40))
        mask = (rng.random((h, w)) < rng.random() * 0.5).astype(np.uint8)
        for fmt in ("relative", "absolute"):
            rle = rle_encode(mask, fmt)
            np.testing.assert_array_equal(rle_decode(rle, h, w, fmt), mask)
            if mask.sum() > 1 and len(rle.split()) > 2:
                assert rle_format(rle, h, w) == fmt
                np.testing.assert_array_equal(rle_decode(rle, h, w), mask)
    assert rle_decode("-1", 3, 3).sum() == 0 and rle_encode(np.zeros((3, 3))) == "-1"
    for bad in ("1 2 3", "5 -1", "0 99"):
        with pytest.raises(ValueError):
            rle_decode(bad, 3, 3, "relative")


def test_siim_bad_rle(roots, tmp_path):
    root = _copy(roots["siim"], tmp_path)
    csv = os.path.join(root, "train-rle.csv")
    lines = open(csv).read().splitlines()
    lines[1] = lines[1].split(",")[0] + ", 12 x"
    with open(csv, "w") as f:
        f.write("\n".join(lines))
    with pytest.raises(DataFormatError, match="line 2: malformed EncodedPixels"):
        SIIMPneumothorax(root, "all", S)
    lines[1] = lines[1].split(",")[0] + f", {S * S} 5"  # parses, but runs off the image
    with open(csv, "w") as f:
        f.write("\n".join(lines))
    ds = SIIMPneumothorax(root, "all", S)
    with pytest.raises(ImageReadError, match="mask does not fit"):
        ds[0]


# ---------------------------------------------------------------- bad files survived


def test_listed_but_absent_files(roots, tmp_path):
    root = _copy(roots["chestxray14"], tmp_path)
    gone = sorted(os.listdir(os.path.join(root, "images")))[:2]
    for name in gone:
        os.remove(os.path.join(root, "images", name))
    with pytest.warns(UserWarning, match="2 listed files are absent"):
        ds = ChestXray14(root, "all", S)
    assert len(ds) == 22 and sorted(ds.skipped) == gone and "file not found" in ds.skipped[gone[0]]
    assert ds.labels.shape == (22, 14)
    with pytest.raises(ImageReadError, match="file not found"):
        ChestXray14(root, "all", S, missing="raise")
    kept = ChestXray14(root, "all", S, missing="keep")
    with pytest.raises(ImageReadError, match="file not found"):
        kept[kept.ids.index(gone[0])]


def test_corrupt_files_raise_or_skip(roots, tmp_path):
    root = _copy(roots["rsna"], tmp_path)
    ds = RSNAPneumonia(root, "all", S)
    with open(ds.paths[3], "r+b") as f:  # truncate one DICOM, garble another
        f.truncate(300)
    with open(ds.paths[4], "wb") as f:
        f.write(b"\x00" * 500)
    with pytest.raises(ImageReadError, match=os.path.basename(ds.paths[3])):
        ds[3]
    safe = RSNAPneumonia(root, "all", S, on_error="skip")
    with pytest.warns(UserWarning, match="skipped") as caught:
        assert safe[3]["id"] == safe.ids[5]
    assert set(safe.bad_ids) == {safe.ids[3], safe.ids[4]} and len(caught) == 2
    loader = torch.utils.data.DataLoader(safe, batch_size=4)
    batches = list(loader)  # a training epoch survives the bad files
    assert sum(len(b["id"]) for b in batches) == len(safe)


def test_folder_and_pool(roots, tmp_path):
    root = tmp_path / "folder"
    imgs = phantoms(4, S)
    for k, rel in enumerate(["p1/a.png", "p1/s/b.jpg", "p2/c.PNG", "d.png"]):
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        from PIL import Image

        Image.fromarray(imgs[k]).save(root / rel, format="PNG" if "png" in rel.lower() else "JPEG")
    write_dicom(root / "p2" / "e.dcm", imgs[0])
    (root / ".hidden.png").write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    ds = CXRFolder(root, image_size=S)
    assert ds.ids == ["d.png", "p1/a.png", "p1/s/b.jpg", "p2/c.PNG", "p2/e.dcm"]
    assert ds.labels.shape == (5, 0) and ds.class_names == ()
    assert ds.patient_ids == ["d.png", "p1", "p1", "p2", "p2"]
    parts = [CXRFolder(root, s, S, fractions=(0.5, 0.25, 0.25)) for s in ("train", "val", "test")]
    assert sorted(i for p in parts for i in p.ids) == ds.ids
    np.testing.assert_allclose(ds[4]["image"].numpy(), ds[1]["image"].numpy(), atol=1e-6)
    nih = ChestXray14(roots["chestxray14"], "test", S)
    pool = CXRPool([nih, ds])
    assert len(pool) == len(nih) + 5 and pool.class_names == nih.class_names
    assert pool.ids[0] == f"chestxray14/{nih.ids[0]}" and pool.ids[-1] == "folder/p2/e.dcm"
    assert torch.isnan(pool.labels[-1]).all() and not torch.isnan(pool.labels[0]).any()
    item = pool[len(nih)]
    assert item["id"] == "folder/d.png" and torch.isnan(item["labels"]).all()
    assert pool.images(0, 2).shape == (2, 1, S, S)
    with pytest.raises(ValueError, match="different image sizes"):
        CXRPool([nih, CXRFolder(root, image_size=S * 2)])


def test_argument_validation(roots):
    root = roots["chestxray14"]
    for kwargs, match in ((dict(split="dev"), "split"), (dict(image_size=4), "image_size"),
                          (dict(on_error="ignore"), "on_error"), (dict(missing="x"), "missing")):
        with pytest.raises(ValueError, match=match):
            ChestXray14(root, **kwargs)
    with pytest.raises(DataFormatError, match="not a folder"):
        ChestXray14(os.path.join(root, "nope"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChestXray14(root, "all", S)  # a clean dataset warns about nothing
