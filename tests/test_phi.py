"""PHI audit: DICOMs full of identifying header values go through every command of the library
(prepare, train, eval, export, viz), and every file written and every line printed is scanned
for those values. None may appear.

The DICOMs (``devtools.fixtures.write_dicom``) carry :data:`FAKE_PHI`: patient name, id,
other ids, birth date, study date, accession number, institution name and address, referring
physician, operator, free text (study description, image and patient comments) and a
burned-in-text description with ``BurnedInAnnotation = YES``. One file is truncated so its
error message reaches the prepare report, the training warnings and the logs.

Scanned: every file under the outputs (caches, reports, metrics, configs, checkpoints, PNGs
including their text chunks, safetensors, npy shards) and the stdout and stderr of every
command, as bytes, with the values in the spellings a writer could use (as stored, with
``^`` as spaces, upper and lower case, UTF-16). Zip archives (PyTorch checkpoints) are scanned
member by member, decompressed; compressed PNG text chunks decompressed.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

pytest.importorskip("pydicom")

from devtools.fixtures import FAKE_PHI, make_rsna  # noqa: E402

# The kinds of file the commands below write: a new kind is a new place PHI could leak to, so
# the audit must be looked at again (and this list extended) when one appears.
FILE_KINDS = {".json", ".jsonl", ".npy", ".pt", ".png", ".safetensors", "stdout", "stderr"}


def _spellings(value: str) -> set[bytes]:
    forms = {value, value.replace("^", " "), value.upper(), value.lower()}
    return {f.encode("utf-8") for f in forms} | {f.encode("utf-16-le") for f in forms}


NEEDLES = {key: _spellings(value) for key, value in FAKE_PHI.items()}


def _png_texts(data: bytes) -> list[bytes]:
    """The text chunks of a PNG, compressed ones inflated (tEXt is plain in the bytes)."""
    out, p = [], 8
    while p + 8 <= len(data):
        (length,) = struct.unpack(">I", data[p:p + 4])
        kind, body = data[p + 4:p + 8], data[p + 8:p + 8 + length]
        if kind == b"zTXt":
            out.append(zlib.decompress(body.split(b"\0", 1)[1][1:]))
        elif kind == b"iTXt":
            keyword, rest = body.split(b"\0", 1)
            flag, text = rest[0], rest[2:].split(b"\0", 2)[2]
            out.append(keyword + (zlib.decompress(text) if flag else text))
        p += 12 + length
    return out


def _blobs(path: Path) -> list[bytes]:
    data = path.read_bytes()
    blobs = [data]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            blobs += [z.read(name) for name in z.namelist()] + [" ".join(z.namelist()).encode()]
    if data.startswith(b"\x89PNG"):
        blobs += _png_texts(data)
    return blobs


def _leaks(path: Path) -> list[str]:
    blobs = _blobs(path)
    return [key for key, needles in NEEDLES.items() if any(n in b for b in blobs for n in needles)]


def test_the_scan_finds_values_in_checkpoints_and_png_text(tmp_path):
    import torch
    from PIL import Image, PngImagePlugin

    name = FAKE_PHI["PatientName"]
    torch.save({"note": name.replace("^", " ")}, tmp_path / "c.pt")
    info = PngImagePlugin.PngInfo()
    info.add_itxt("Comment", FAKE_PHI["ImageComments"].lower(), zip=True)
    Image.new("L", (4, 4)).save(tmp_path / "p.png", pnginfo=info)
    (tmp_path / "u.txt").write_bytes(FAKE_PHI["InstitutionName"].encode("utf-16-le"))
    assert _leaks(tmp_path / "c.pt") == ["PatientName"]
    assert _leaks(tmp_path / "p.png") == ["ImageComments"]
    assert _leaks(tmp_path / "u.txt") == ["InstitutionName"]


def _run(logs: Path, name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=600)
    (logs / f"{name}.stdout").write_text(proc.stdout)
    (logs / f"{name}.stderr").write_text(proc.stderr)
    assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"


def test_no_identifying_value_leaves_the_source_files(tmp_path):
    size = "32"
    root = make_rsna(tmp_path / "rsna", n=24, size=32)
    images = sorted((Path(root) / "stage_2_train_images").iterdir())
    with open(images[5], "r+b") as f:  # unreadable: its error goes into reports and warnings
        f.truncate(700)
    out, logs = tmp_path / "out", tmp_path / "out" / "logs"
    logs.mkdir(parents=True)
    cache, run, raw_run = out / "cache", out / "run", out / "raw-run"
    _run(logs, "prepare", "spcl_fast.data.prepare", "--dataset", "rsna", "--root", root,
         "--out", str(cache), "--size", size, "--workers", "2")
    common = ["--preset", "smoke", "--dataset", "rsna", "--data-root", root, "--image-size",
              size, "--steps", "3", "--save-every", "2"]
    _run(logs, "train-cache", "spcl_fast.train", *common, "--data-cache", str(cache),
         "--out", str(run))
    _run(logs, "train-raw", "spcl_fast.train", *common, "--num-workers", "2",
         "--out", str(raw_run))  # decodes the DICOMs itself, meets the truncated one
    _run(logs, "eval", "spcl_fast.eval", "linear-probe", "--checkpoint", str(run),
         "--dataset", "rsna", "--root", root, "--cache", str(cache), "--out", str(out / "eval"),
         "--device", "cpu", "--probe-steps", "20")
    _run(logs, "export", "spcl_fast.export", "--checkpoint", str(run), "--out",
         str(out / "export"))
    _run(logs, "viz-partition", "spcl_fast.viz", "partition", "--image", str(images[0]),
         "--checkpoint", str(run), "--out", str(out / "viz" / "partition.png"))
    _run(logs, "viz-attention", "spcl_fast.viz", "attention", "--image", str(images[1]),
         "--checkpoint", str(run), "--out", str(out / "viz" / "attention.png"))
    bad = images[5].name  # the bad file was met and named, in the report and the warnings
    assert bad in (cache / "report.json").read_text()
    assert f"{bad}: no pixel data; skipped" in (logs / "train-raw.stderr").read_text()

    scanned: dict[str, int] = {}
    leaks: list[tuple[str, str]] = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        kind = path.suffix if path.parent != logs else path.suffix.lstrip(".")
        scanned[kind] = scanned.get(kind, 0) + 1
        leaks += [(str(path), key) for key in _leaks(path)]
    assert not leaks, leaks
    assert set(scanned) == FILE_KINDS, f"file kinds written: {sorted(scanned)}"
    print("PHI audit scanned", ", ".join(f"{n} {k}" for k, n in sorted(scanned.items())))
    assert os.path.isfile(cache / "report.json") and scanned[".pt"] >= 2
