"""The preprocessing cache: prepare (in-process and with workers), resume after interruption,
unreadable files skipped and reported, no PHI written, datasets reading from the cache."""

from __future__ import annotations

import filecmp
import json
import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom")

from devtools.fixtures import (  # noqa: E402
    FAKE_PHI,
    make_chestxray14,
    make_rsna,
    make_siim,
)
from spcl_fast.data import (  # noqa: E402
    CacheReader,
    ChestXray14,
    CXRFolder,
    DataFormatError,
    RSNAPneumonia,
    build_dataset,
)
from spcl_fast.data.prepare import main, prepare  # noqa: E402

S = 32


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    return make_chestxray14(tmp_path_factory.mktemp("nih"), n=24, size=48)


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("name,make", [("chestxray14", make_chestxray14), ("rsna", make_rsna),
                                       ("siim", make_siim)])
def test_cached_items_match_raw(tmp_path, name, make):
    root = make(tmp_path / "src", n=10, size=40)
    report = prepare(name, root, tmp_path / "c", S, workers=0, shard_size=4, progress=False)
    assert report["complete"] and report["num_failed"] == 0 and report["num_items"] == 10
    for split in ("all", "val"):
        raw = build_dataset(name, root, split, S)
        cached = build_dataset(name, root, split, S, cache=str(tmp_path / "c"))
        assert cached.ids == raw.ids and torch.equal(cached.labels, raw.labels)
        for j in range(len(raw)):
            a, b = raw[j], cached[j]
            assert b["image"].dtype == torch.float32 and b["image"].shape == (1, S, S)
            assert (a["image"] - b["image"]).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding
            if "mask" in a:
                assert torch.equal(a["mask"], b["mask"])
    if name == "rsna":
        ds = RSNAPneumonia(root, "all", S, cache=str(tmp_path / "c"))
        j = next(j for j in range(len(ds)) if len(ds.boxes[j]))
        np.testing.assert_allclose(ds.image_boxes(j), RSNAPneumonia(root, "all", S).image_boxes(j))


def test_resume_after_interruption_is_byte_identical(nih, tmp_path):
    out, ref = tmp_path / "resumed", tmp_path / "oneshot"
    first = prepare("chestxray14", nih, out, S, workers=0, shard_size=8, max_shards=1,
                    progress=False)
    assert not first["complete"] and first["num_done"] == 8
    with pytest.raises(DataFormatError, match="incomplete"):
        ChestXray14(nih, "all", S, cache=str(out))
    (out / "shard-00001.npy.tmp999.npy").write_bytes(b"half a shard")  # a killed writer
    second = prepare("chestxray14", nih, out, S, workers=2, shard_size=8, progress=False)
    assert second["complete"] and second["num_done"] == 24
    prepare("chestxray14", nih, ref, S, workers=2, shard_size=8, progress=False)
    assert _files(out) == _files(ref)
    for f in _files(ref):
        assert filecmp.cmp(out / f, ref / f, shallow=False), f
    with pytest.raises(ValueError, match=f"other settings: image_size {S} \\(now {S * 2}\\)"):
        prepare("chestxray14", nih, out, S * 2, workers=0, shard_size=8, progress=False)


@pytest.mark.parametrize("flags, message", [
    (["--max-shards", "-1"], "max_shards must be >= 1, got -1"),
    (["--workers", "-1"], "workers must be >= 0"),
    (["--shard-size", "0"], "shard_size must be >= 1"),
    (["--size", "4"], "image_size must be an int >= 8"),
    (["--root", "/nonexistent/nih"], "dataset root is not a folder"),
    (["--out", "{file}"], "is a file, not a cache folder"),
])
def test_prepare_cli_reports_bad_input_in_one_line(nih, tmp_path, flags, message):
    (tmp_path / "afile").write_text("")
    argv = ["--dataset", "chestxray14", "--root", nih, "--out", str(tmp_path / "c"),
            "--workers", "0", "--quiet", *flags]
    argv = [a.replace("{file}", str(tmp_path / "afile")) for a in argv]
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        main(argv)


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    root = make_rsna(tmp_path / "rsna", n=12, size=S)
    ds = RSNAPneumonia(root, "all", S)
    bad, gone = ds.ids[2], ds.ids[7]
    with open(ds.paths[2], "r+b") as f:
        f.truncate(400)
    os.remove(ds.paths[7])
    report = prepare("rsna", root, tmp_path / "c", S, workers=0, shard_size=5, progress=False)
    assert report["complete"] and report["num_failed"] == 2
    errors = {r["id"]: r["error"] for r in report["failures"]}
    assert set(errors) == {bad, gone} and "file not found" in errors[gone]
    assert json.load(open(tmp_path / "c" / "report.json")) == report
    with pytest.warns(UserWarning, match="1 listed files are absent"):
        RSNAPneumonia(root, "all", S)  # the raw path sees the absent file at construction
    with pytest.warns(UserWarning, match="2 files the cache could not read were skipped"):
        cached = RSNAPneumonia(root, "all", S, cache=str(tmp_path / "c"))
    assert len(cached) == 10 and set(cached.skipped) == {bad, gone}
    assert cached.labels.shape == (10, 1) and bad not in cached.ids
    assert [cached[j]["id"] for j in range(len(cached))] == cached.ids


def test_nothing_identifying_is_written(tmp_path, capsys):
    root = make_rsna(tmp_path / "rsna", n=6, size=S)
    ds = RSNAPneumonia(root, "all", S)
    with open(ds.paths[1], "r+b") as f:  # a failure too: its message goes into the report
        f.truncate(600)
    out = tmp_path / "cache"
    assert main(["--dataset", "rsna", "--root", root, "--out", str(out), "--size", str(S),
                 "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "1 unreadable" in captured.out and "prepare rsna" in captured.err  # progress bar
    blobs = [captured.out.encode(), captured.err.encode()]
    blobs += [open(out / f, "rb").read() for f in _files(out)]
    for value in FAKE_PHI.values():
        for blob in blobs:
            assert value.encode() not in blob


def test_cache_checks_and_pickling(nih, tmp_path):
    out = tmp_path / "c"
    prepare("chestxray14", nih, out, S, workers=0, shard_size=8, progress=False)
    with pytest.raises(DataFormatError, match="image_size=32") as exc:
        ChestXray14(nih, "all", 64, cache=str(out))
    assert "prepare one with --size 64, or train at --image-size 32" in str(exc.value)
    with pytest.raises(DataFormatError, match="cache of 'chestxray14'"):
        CXRFolder(nih, "all", S, cache=str(out))
    with pytest.raises(DataFormatError, match="not a cache folder"):
        ChestXray14(nih, "all", S, cache=str(tmp_path))
    reader = CacheReader(out)
    ds = ChestXray14(nih, "train", S, cache=reader)
    ds[0]  # maps a shard
    assert len(pickle.dumps(ds)) < 20_000  # the maps are not pickled with the dataset
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    images = torch.cat([b["image"] for b in loader])
    torch.testing.assert_close(images, ds.images())
    with pytest.raises(ValueError, match="needs no cache"):
        prepare("synthetic", None, tmp_path / "s", S)


def test_uint16_cache(nih, tmp_path):
    prepare("chestxray14", nih, tmp_path / "c16", S, workers=0, dtype="uint16", progress=False)
    raw, cached = (ChestXray14(nih, "test", S, cache=c) for c in (None, str(tmp_path / "c16")))
    assert CacheReader(tmp_path / "c16")._array("shard", 0).dtype == np.uint16
    assert (raw.images() - cached.images()).abs().max() <= 0.5 / 65535 + 1e-6
