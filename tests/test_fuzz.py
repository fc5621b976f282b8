"""The mutation campaign over the readers (``devtools.fuzz``): a sample in the default tier,
the campaign's own verdicts shown able to fail, bad files through the datasets, ``prepare``,
DataLoader workers and a training run; the full 2,000-input campaign in the slow tier."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom")

from devtools import fuzz  # noqa: E402
from spcl_fast.data import CXRFolder  # noqa: E402
from spcl_fast.data.cache import CacheReader, quantize  # noqa: E402
from spcl_fast.data.images import load_square  # noqa: E402
from spcl_fast.data.prepare import prepare  # noqa: E402


def _unexpected(report: dict) -> list[dict]:
    return [c for c in report["cases"] if c["verdict"] == "unexpected"]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """A default-tier sample, inputs kept for the dataset checks."""
    out = tmp_path_factory.mktemp("fuzz")
    start = time.monotonic()
    report = fuzz.run_campaign(160, out, seed=1, keep=True)
    return out, report, time.monotonic() - start


def test_campaign_sample_has_no_unexpected_outcome(campaign):
    out, report, seconds = campaign
    assert not _unexpected(report), _unexpected(report)
    assert report["inputs"] == 160 == report["read"] + report["rejected"]
    assert report["read"] > 10 and report["rejected"] > 80
    kinds = {c["mutation"].split(":")[0] for c in report["cases"]}
    assert {"flip_bits", "truncate_at_boundary", "dicom_edit", "transfer_syntax"} <= kinds
    assert report["max_seconds"] < 10 and report["max_peak_mb"] < 1024
    assert seconds < 60
    for c in report["cases"]:
        if c["verdict"] == "rejected":
            assert c["path"] in c["message"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["inputs"] == 160 and len(saved["cases"]) == 160


def test_csv_campaign_sample_has_no_unexpected_outcome(tmp_path):
    report = fuzz.csv_campaign(100, tmp_path, seed=1)
    assert not _unexpected(report), _unexpected(report)
    assert report["read"] > 10 and report["rejected"] > 10


def test_inputs_are_reproducible_from_the_seed_and_index(tmp_path):
    seeds = fuzz.write_seeds(tmp_path / "a", real=False)
    blobs = {s.name: open(s.path, "rb").read() for s in seeds}
    again = fuzz.write_seeds(tmp_path / "b", real=False)  # the same bytes every campaign
    assert blobs == {s.name: open(s.path, "rb").read() for s in again}
    for i in range(20):
        a = [fuzz.mutate(s, blobs[s.name], random.Random(f"0:{i}")) for s in seeds]
        b = [fuzz.mutate(s, blobs[s.name], random.Random(f"0:{i}")) for s in seeds]
        assert a == b


# The campaign's verdicts can fail: a reader that hangs, kills its process, allocates beyond the
# bound, raises another exception, or leaves a good file reading differently is unexpected.
def _misbehaving_reader(path):
    name = os.path.basename(path)
    index = int(name.split("-")[0])
    kind = index % 5
    if kind == 0:
        time.sleep(60)
    elif kind == 1:
        os._exit(3)
    elif kind == 2:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        assert block.sum() > 0
    elif kind == 3:
        raise KeyError("not a documented error")
    else:
        os.environ["SPCL_FUZZ_TEST_CHANGED"] = "1"  # this child's next seed reads differ


def _read_image_that_changes(path, *args, **kwargs):
    img = np.zeros((4, 4), np.float32)
    return img + 1 if os.environ.get("SPCL_FUZZ_TEST_CHANGED") else img


def test_campaign_verdicts_catch_hangs_crashes_memory_errors_and_changed_seeds(tmp_path,
                                                                               monkeypatch):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the fakes reach the reading process through fork")
    monkeypatch.setattr(fuzz, "read_all", _misbehaving_reader)
    monkeypatch.setattr("spcl_fast.data.images.read_image", _read_image_that_changes)
    monkeypatch.delenv("SPCL_FUZZ_TEST_CHANGED", raising=False)
    # The timeout leaves a loaded machine time to allocate and read; only the hang exceeds it.
    report = fuzz.run_campaign(5, tmp_path, seed=0, real=False, timeout=8, memory_mb=150,
                               check_every=1)
    messages = [c["message"] for c in report["cases"]]
    assert report["unexpected"] == 5, messages
    assert messages[0] == "hang (> 8 s)" and messages[1] == "crash (exit 3)"
    assert messages[2].startswith("peak memory +") and messages[3].startswith("KeyError")
    assert messages[4].startswith("good files read differently after this input")
    assert len(os.listdir(tmp_path / "unexpected")) == 5


def test_cli(tmp_path, capsys):
    assert fuzz.main(["--n", "12", "--csv", "6", "--out", str(tmp_path), "--no-real"]) == 0
    out = capsys.readouterr().out
    assert "image files: 12 inputs" in out and "metadata files: 6 inputs" in out
    assert "0 unexpected" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"]["inputs"] == 12 and report["csv"]["inputs"] == 6
    with pytest.raises(SystemExit, match="error: --n and --csv must be >= 0"):
        fuzz.main(["--n", "-1"])


# ---------------------------------------------------------------- bad files at dataset level


@pytest.fixture(scope="module")
def mixed_folder(campaign, tmp_path_factory):
    """The good seeds and the sample's mutated inputs in one folder; the names of the inputs
    the campaign read and of those it rejected."""
    out, report, _ = campaign
    root = tmp_path_factory.mktemp("mixed")
    for seed in os.listdir(out / "seeds"):
        shutil.copy(out / "seeds" / seed, root / f"seed-{seed}")
    for c in report["cases"]:
        shutil.copy(c["path"], root / os.path.basename(c["path"]))
    seeds = {f"seed-{s}" for s in os.listdir(out / "seeds")}
    read = {os.path.basename(c["path"]) for c in report["cases"] if c["verdict"] == "read"}
    rejected = {os.path.basename(c["path"]) for c in report["cases"]
                if c["verdict"] == "rejected"}
    return root, seeds, read | seeds, rejected


def test_dataloader_workers_skip_every_bad_file(mixed_folder):
    root, _, read, rejected = mixed_folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CXRFolder(root, image_size=fuzz.SIZE, on_error="skip")
        loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
        batches = list(loader)
    ids = [i for b in batches for i in b["id"]]
    assert len(ids) == len(ds) == len(read) + len(rejected)
    assert set(ids) <= read and set(ids) >= read  # each readable file comes back itself
    images = torch.cat([b["image"] for b in batches])
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_prepare_lists_exactly_the_rejected_files_and_reads_good_ones_identically(
        mixed_folder, tmp_path):
    root, seeds, read, rejected = mixed_folder
    report = prepare("folder", str(root), str(tmp_path), size=fuzz.SIZE, workers=2,
                     shard_size=64, progress=False)
    assert report["complete"] and report["num_items"] == len(read) + len(rejected)
    assert {f["id"] for f in report["failures"]} == rejected
    for f in report["failures"]:
        assert os.path.join(str(root), f["id"]) in f["error"]
    cache = CacheReader(tmp_path)
    for name in seeds:
        pos = cache.positions([name])[0]
        want = quantize(load_square(os.path.join(root, name), fuzz.SIZE)[0], "uint8")
        assert np.array_equal(cache.image(pos)[0].mul(255).round().numpy(), want), name


def test_training_run_skips_the_bad_files(mixed_folder, tmp_path):
    root, *_ = mixed_folder
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "spcl_fast.train", "--preset", "smoke", "--dataset", "folder",
         "--data-root", str(root), "--image-size", str(fuzz.SIZE), "--steps", "3",
         "--num-workers", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_full_campaign(tmp_path):
    """The README's numbers: 2,000 mutated image files and 400 malformed metadata files."""
    images = fuzz.run_campaign(2000, tmp_path / "images", seed=0)
    tables = fuzz.csv_campaign(400, tmp_path / "csv", seed=0)
    assert not _unexpected(images) and not _unexpected(tables)
    assert images["max_seconds"] < 10 and images["max_peak_mb"] < 1024
