"""The DICOM reader: grayscale pipeline semantics, transfer syntaxes, bad files, fuzzing.

Files are written here (``devtools.fixtures.write_dicom``) or come from packages: pydicom's
own test files and, when installed, ``pydicom-data`` (the real MONOCHROME1 radiograph RG1).
"""

from __future__ import annotations

import importlib.util
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402

from devtools.fixtures import FAKE_PHI, phantoms, write_dicom  # noqa: E402
from spcl_fast.data import CXRFolder, ImageReadError, read_dicom  # noqa: E402

HAS_PYDICOM_DATA = importlib.util.find_spec("data_store") is not None
needs_pydicom_data = pytest.mark.skipif(not HAS_PYDICOM_DATA,
                                        reason="needs pydicom-data (pip install pydicom-data)")
HAS_PYLIBJPEG = all(importlib.util.find_spec(m) is not None
                    for m in ("pylibjpeg", "libjpeg", "openjpeg", "rle"))
needs_data_extra = pytest.mark.skipif(
    not HAS_PYLIBJPEG, reason="needs the data extra (pip install 'spcl-fast[data]')")
HAS_PYJPEGLS = importlib.util.find_spec("jpeg_ls") is not None


def _testdata(name: str) -> str:
    """A file shipped by pydicom or pydicom-data (never downloaded: the lookup is local)."""
    from pydicom.data import get_testdata_file

    roots = [os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")]
    if HAS_PYDICOM_DATA:
        import data_store

        roots.append(os.path.join(os.path.dirname(data_store.__file__), "data"))
    for r in roots:
        if os.path.isfile(os.path.join(r, name)):
            return get_testdata_file(name)
    pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="module")
def ramp12():
    """A 12-bit image using the whole stored range."""
    return (np.arange(48 * 40).reshape(48, 40) * 4095 // (48 * 40 - 1)).astype(np.uint16)


# ---------------------------------------------------------------- grayscale pipeline semantics


def test_stored_range_normalisation(tmp_path, ramp12):
    out = read_dicom(write_dicom(tmp_path / "a.dcm", ramp12, bits_stored=12))
    assert out.dtype == np.float32 and out.shape == ramp12.shape
    np.testing.assert_allclose(out, ramp12 / 4095, atol=1e-6)
    u8 = phantoms(1, 32)[0]
    np.testing.assert_allclose(read_dicom(write_dicom(tmp_path / "b.dcm", u8)), u8 / 255,
                               atol=1e-6)


def test_signed_stored_range(tmp_path):
    v = np.array([[-2048, -1, 0, 2047]], np.int16)
    out = read_dicom(write_dicom(tmp_path / "s.dcm", v, bits_stored=12, signed=True))
    np.testing.assert_allclose(out, (v + 2048) / 4095, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path, ramp12):
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", ramp12, bits_stored=12))
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", ramp12, bits_stored=12,
                                photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)


def test_rescale_then_window(tmp_path, ramp12):
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 4000.0
    out = read_dicom(write_dicom(tmp_path / "w.dcm", ramp12, bits_stored=12,
                                 rescale=(slope, intercept), window=(center, width)))
    hu = ramp12 * slope + intercept
    # DICOM LINEAR window (PS3.3 C.11.2.1.2.1), onto the rescaled stored range.
    expect = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(out, expect, atol=1e-5)


def test_window_monochrome1_and_sigmoid(tmp_path, ramp12):
    lin = read_dicom(write_dicom(tmp_path / "l.dcm", ramp12, bits_stored=12,
                                 window=(2048, 1024), photometric="MONOCHROME1"))
    expect = 1 - np.clip((ramp12 - 2047.5) / 1023 + 0.5, 0, 1)
    np.testing.assert_allclose(lin, expect, atol=1e-5)
    sig = read_dicom(write_dicom(tmp_path / "g.dcm", ramp12, bits_stored=12,
                                 window=(2048, 1024), voi_function="SIGMOID"))
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-4 * (ramp12 - 2048.0) / 1024)), atol=1e-5)


def test_invalid_window_falls_back_to_stored_range(tmp_path, ramp12):
    out = read_dicom(write_dicom(tmp_path / "z.dcm", ramp12, bits_stored=12, window=(100, 0)))
    np.testing.assert_allclose(out, ramp12 / 4095, atol=1e-6)


def test_non_finite_window_is_ignored_and_non_finite_rescale_rejected(tmp_path, ramp12):
    """Found by the fuzz campaign: a NaN rescale or window gave a NaN image, returned."""
    for window in [("NaN", 100), (2000, "inf"), (["NaN", "1"], [1, 2])]:
        out = read_dicom(write_dicom(tmp_path / "w.dcm", ramp12, bits_stored=12, window=window))
        np.testing.assert_allclose(out, ramp12 / 4095, atol=1e-6)
    for rescale in [("NaN", 0), (1, "-inf"), ("1e308", 0)]:
        path = write_dicom(tmp_path / "r.dcm", ramp12, bits_stored=12, rescale=rescale)
        with pytest.raises(ImageReadError, match="r.dcm: non-finite rescale"):
            read_dicom(path)


def test_voi_lut_sequence_wins_over_window(tmp_path):
    v = np.array([[0, 1, 2, 3, 10]], np.uint16)
    lut = [255, 200, 100, 0]  # an inverting LUT, 8-bit output; inputs past the end clamp
    out = read_dicom(write_dicom(tmp_path / "v.dcm", v, bits_stored=12, window=(5, 10),
                                 voi_lut=(0, 8, lut)))
    np.testing.assert_allclose(out, [[1.0, 200 / 255, 100 / 255, 0.0, 0.0]], atol=1e-6)


def test_colour_and_multiframe(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    np.testing.assert_allclose(read_dicom(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")),
                               0.587, atol=1e-3)
    frames = np.stack([np.full((6, 5), 10, np.uint8), np.full((6, 5), 250, np.uint8)])
    path = write_dicom(tmp_path / "f.dcm", frames)
    np.testing.assert_allclose(read_dicom(path), 10 / 255, atol=1e-6)
    np.testing.assert_allclose(read_dicom(path, frame=1), 250 / 255, atol=1e-6)
    with pytest.raises(ImageReadError, match="frame 2 out of range"):
        read_dicom(path, frame=2)


def test_file_objects_and_files_without_meta(tmp_path, ramp12):
    path = write_dicom(tmp_path / "a.dcm", ramp12, bits_stored=12)
    with open(path, "rb") as f:
        np.testing.assert_allclose(read_dicom(io.BytesIO(f.read())), ramp12 / 4095, atol=1e-6)
    # A bare dataset: no preamble, no file meta (old files); implicit VR little endian.
    ds = pydicom.dcmread(path)
    raw = tmp_path / "raw.dcm"
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)
    np.testing.assert_allclose(read_dicom(raw), ramp12 / 4095, atol=1e-6)


# ---------------------------------------------------------------- transfer syntaxes


LOSSLESS = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
            uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLSLossless,
            uid.JPEG2000Lossless]


@pytest.mark.parametrize("syntax", LOSSLESS, ids=[s.name for s in LOSSLESS])
def test_lossless_syntaxes_written_and_decoded(tmp_path, ramp12, syntax):
    if syntax in uid.JPEGLSTransferSyntaxes and not HAS_PYJPEGLS:
        pytest.skip("writing JPEG-LS needs pyjpegls (in the test extra)")
    if syntax in uid.JPEGLSTransferSyntaxes + uid.JPEG2000TransferSyntaxes and not HAS_PYLIBJPEG:
        pytest.skip("needs the data extra")
    path = write_dicom(tmp_path / "x.dcm", ramp12, bits_stored=12, transfer_syntax=syntax)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_allclose(read_dicom(path), ramp12 / 4095, atol=1e-6)
    if syntax.is_compressed and HAS_PYLIBJPEG:  # the data extra's plugins alone suffice
        np.testing.assert_allclose(read_dicom(path, plugin="pylibjpeg"), ramp12 / 4095,
                                   atol=1e-6)


@needs_data_extra
def test_lossy_syntaxes_written_and_decoded(tmp_path, ramp12):
    u8 = phantoms(1, 64)[0]
    path = write_dicom(tmp_path / "jb.dcm", u8, transfer_syntax=uid.JPEGBaseline8Bit)
    for plugin in ("", "pylibjpeg"):
        assert np.abs(read_dicom(path, plugin=plugin) - u8 / 255).mean() < 0.01
    path = write_dicom(tmp_path / "j2k.dcm", ramp12, bits_stored=12,
                       transfer_syntax=uid.JPEG2000, j2k_cr=[4])
    assert np.abs(read_dicom(path, plugin="pylibjpeg") - ramp12 / 4095).max() < 0.01
    if HAS_PYJPEGLS:
        path = write_dicom(tmp_path / "jls.dcm", ramp12, bits_stored=12,
                           transfer_syntax=uid.JPEGLSNearLossless, jls_error=3)
        err = np.abs(read_dicom(path, plugin="pylibjpeg") - ramp12 / 4095).max()
        assert err <= 3 / 4095 + 1e-6


def _jpeg_lossless_sv1(arr: np.ndarray, precision: int) -> bytes:
    """A minimal JPEG Lossless encoder (ITU T.81 Annex H: process 14, predictor 1, one
    component, one Huffman table giving every difference category a 5-bit code), so the test
    writes its own JPEG Lossless file instead of trusting a packaged one."""
    h, w = arr.shape
    x = arr.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first line: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]  # elsewhere: predictor 1 (left)
    bits = []
    for d in (x - pred).ravel().tolist():
        size = abs(d).bit_length()
        bits.append(format(size, "05b"))
        if size:
            bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with ones
    data = bytearray()
    for k in range(0, len(stream), 8):
        byte = int(stream[k:k + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0)  # byte stuffing
    counts = [0] * 16
    counts[4] = 17  # 17 categories (0..16), all with 5-bit codes
    dht = bytes([0x00, *counts, *range(17)])
    sof = bytes([precision]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns=1, Cs=1, Td=0, Ss=1 (predictor 1), Se=0, Ah/Al=0

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    return (b"\xff\xd8" + segment(0xC4, dht) + segment(0xC3, sof) + segment(0xDA, sos)
            + bytes(data) + b"\xff\xd9")


@needs_data_extra
@pytest.mark.parametrize("syntax", [uid.JPEGLosslessSV1, uid.JPEGLossless],
                         ids=["JPEGLosslessSV1", "JPEGLossless"])
def test_jpeg_lossless_written_and_decoded(tmp_path, ramp12, syntax):
    from pydicom.encaps import encapsulate

    img = ramp12.copy()
    img[::7, ::5] = 4095 - img[::7, ::5]  # large jumps: every difference category is used
    path = write_dicom(tmp_path / "ll.dcm", img, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([_jpeg_lossless_sv1(img, 12)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_allclose(read_dicom(path, plugin="pylibjpeg"), img / 4095, atol=1e-6)


@needs_data_extra
def test_syntaxes_we_cannot_write_decode_from_packaged_files():
    """No Python encoder writes JPEG Extended 12-bit (nor big endian): decode the files pydicom
    ships, cross-checked against another encoding of the same scan."""
    extended = read_dicom(_testdata("JPGExtended.dcm"), plugin="pylibjpeg")
    assert extended.shape == (1024, 256) and 0 <= extended.min() <= extended.max() <= 1
    if HAS_PYDICOM_DATA:  # the same scan, JPEG Lossless (16-bit signed) vs lossy 12-bit
        lossless = pydicom.dcmread(_testdata("JPEG-LL.dcm")).pixel_array.astype(np.float64)
        lossy = pydicom.dcmread(_testdata("JPGExtended.dcm")).pixel_array.astype(np.float64)
        assert np.corrcoef(lossless.ravel(), lossy.ravel())[0, 1] > 0.98
        assert np.abs(lossless - lossy).mean() < 0.02 * np.ptp(lossless)
    big = read_dicom(_testdata("MR_small_bigendian.dcm"))
    np.testing.assert_array_equal(big, read_dicom(_testdata("MR_small.dcm")))


@needs_pydicom_data
def test_real_monochrome1_radiograph():
    """RG1: a real PA chest CR, MONOCHROME1, 15 bits stored, window 15000/30000."""
    path = _testdata("RG1_UNCR.dcm")
    img = read_dicom(path)
    assert img.shape == (1955, 1841) and img.dtype == np.float32
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expect = 1 - np.clip((raw - 14999.5) / 29999 + 0.5, 0, 1)
    np.testing.assert_allclose(img, expect, atol=1e-5)
    # Displayed like a film: the mediastinum (centre columns) is brighter than the lungs.
    h, w = img.shape
    centre = img[int(0.3 * h):int(0.6 * h), int(0.47 * w):int(0.53 * w)].mean()
    lungs = img[int(0.3 * h):int(0.6 * h), int(0.2 * w):int(0.35 * w)].mean()
    assert centre > lungs + 0.05
    if HAS_PYLIBJPEG:  # the JPEG 2000 lossless copy decodes to the same pixels
        np.testing.assert_array_equal(read_dicom(_testdata("RG1_J2KR.dcm")), img)


# ---------------------------------------------------------------- bad files


def _no_phi(text: str) -> None:
    for value in FAKE_PHI.values():
        assert value not in text


def test_bad_files_raise_the_documented_error(tmp_path, ramp12):
    good = write_dicom(tmp_path / "good.dcm", ramp12, bits_stored=12)
    data = open(good, "rb").read()

    def bad(name, content):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    cases = {
        "missing": (tmp_path / "absent.dcm", "file not found"),
        "truncated": (bad("trunc.dcm", data[: len(data) * 2 // 3]), "truncated"),
        "header_only": (bad("head.dcm", data[:200]), ""),
        "garbage": (bad("garbage.dcm", os.urandom(3000)), ""),
        "empty": (bad("empty.dcm", b""), ""),
    }
    rle = open(write_dicom(tmp_path / "rle.dcm", phantoms(1, 32)[0],
                           transfer_syntax=uid.RLELossless), "rb").read()
    cases["truncated_encapsulated"] = (bad("trunc_rle.dcm", rle[: len(rle) * 2 // 3]),
                                       "truncated")
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    cases["no_pixel_data"] = (tmp_path / "nopix.dcm", "no pixel data")
    ds = pydicom.dcmread(good)
    ds.Rows = ds.Columns = 60000
    ds.save_as(tmp_path / "huge.dcm")
    cases["absurd_dims"] = (tmp_path / "huge.dcm", "absurd dimensions")
    ds = pydicom.dcmread(good)
    ds.Rows = 0
    ds.save_as(tmp_path / "zero.dcm")
    cases["zero_rows"] = (tmp_path / "zero.dcm", "absurd dimensions")
    jpeg = bytearray(open(write_dicom(tmp_path / "j.dcm", phantoms(1, 64)[0],
                                      transfer_syntax=uid.JPEGBaseline8Bit), "rb").read())
    soi = bytes(jpeg).index(b"\xff\xd8\xff")
    jpeg[soi:soi + 120] = b"\x00" * 120  # wipe the JPEG headers (SOI, tables, frame header)
    cases["corrupt_jpeg"] = (bad("cj.dcm", bytes(jpeg)), "")
    for name, (path, fragment) in cases.items():
        with pytest.raises(ImageReadError) as info:
            read_dicom(path)
        msg = str(info.value)
        assert str(path) in msg and fragment in msg, (name, msg)
        _no_phi(msg)


def _panicking_rle(path) -> str:
    """A 16-bit RLE DICOM whose first segment opens with a one-byte literal run: the segments
    then decode to unequal lengths and pylibjpeg-rle's Rust code panics (index out of
    bounds), raising pyo3's PanicException, a BaseException that ``except Exception`` misses."""
    image = phantoms(1, 32)[0].astype(np.uint16) * 257
    ds = pydicom.dcmread(write_dicom(path, image, transfer_syntax=uid.RLELossless))
    data = bytearray(ds.PixelData)
    fragment = data.index(b"\xfe\xff\x00\xe0", 8) + 8  # the item after the offset table
    data[fragment + 64] = 0  # past the 64-byte RLE header: segment 1's first byte
    ds.PixelData = bytes(data)
    ds.save_as(path)
    return os.fspath(path)


@needs_data_extra
def test_decoder_panic_is_an_image_read_error(tmp_path, monkeypatch):
    path = _panicking_rle(tmp_path / "panic.dcm")
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    except Exception:
        pytest.skip("this pylibjpeg-rle raises an Exception here, no longer panics")
    except BaseException as exc:
        assert type(exc).__name__ == "PanicException"
    else:
        pytest.skip("this pylibjpeg-rle decodes the file")
    with pytest.raises(ImageReadError, match="panic.dcm: cannot decode pixel data "
                                             r"\(PanicException"):
        read_dicom(path)

    # In a DataLoader worker, with on_error="skip": the next readable item stands in.
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "z.png")
    ds = CXRFolder(tmp_path, image_size=16, on_error="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    assert [b["id"] for b in loader] == [["z.png", "z.png"]]

    # Interrupts are not decoder failures: they pass through.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pydicom.pixels, "pixel_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_dicom(path)


def test_fuzz_mutated_dicoms_as_file_objects(tmp_path):
    """The campaign's DICOM mutations (``devtools.fuzz``, which reads paths) through the
    file-object path: every input decodes to [0, 1] or raises ImageReadError naming it."""
    import random

    from devtools import fuzz

    seeds = [s for s in fuzz.write_seeds(tmp_path, real=False) if s.kind == "dicom"]
    blobs = {s.name: open(s.path, "rb").read() for s in seeds}
    failed = 0
    for count in range(200):
        rng = random.Random(count)
        seed = rng.choice(seeds)
        stream = io.BytesIO(fuzz.mutate(seed, blobs[seed.name], rng)[0])
        stream.name = f"fuzz-{count}.dcm"
        try:
            out = read_dicom(stream)
        except ImageReadError as exc:
            assert f"fuzz-{count}.dcm" in str(exc)
            _no_phi(str(exc))
            failed += 1
        else:
            assert out.dtype == np.float32 and out.ndim == 2
            assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert 0 < failed < 200


def test_no_phi_is_parsed(tmp_path, ramp12, monkeypatch):
    """The reader asks pydicom for the pixel-module tags only: names, ids, dates and
    institutions never reach memory."""
    path = write_dicom(tmp_path / "a.dcm", ramp12, bits_stored=12)
    seen = []
    real = pydicom.dcmread

    def spy(*args, **kwargs):
        ds = real(*args, **kwargs)
        seen.append(ds)
        return ds

    monkeypatch.setattr(pydicom, "dcmread", spy)
    read_dicom(path)
    assert seen and all(k not in seen[0] for k in FAKE_PHI)


def test_pixel_data_without_pixel_module(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.PatientName = FAKE_PHI["PatientName"]
    ds.add_new("PixelData", "OB", b"\x00" * 16)
    path = tmp_path / "p.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="Rows/Columns missing"):
        read_dicom(path)
