"""PNG/JPEG decoding to [0, 1], the aspect policy (fit_square), and bad image files."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from spcl_fast.data import ImageReadError, fit_square, read_image
from spcl_fast.data.images import fit_square_mask, load_square, square_transform


def test_png_modes(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g).save(tmp_path / "l.png")
    np.testing.assert_allclose(read_image(tmp_path / "l.png"), g / 255, atol=1e-6)
    g16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(g16).save(tmp_path / "i16.png")
    np.testing.assert_allclose(read_image(tmp_path / "i16.png"), g16 / 65535, atol=1e-6)
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])  # NIH ships a few RGBA files
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), g / 255, atol=1 / 255)
    Image.fromarray(g).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (16, 16)


def test_jpeg_and_draft_keep_the_original_size(tmp_path):
    g = np.tile(np.linspace(0, 255, 400, dtype=np.float32), (300, 1)).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "x.jpg", quality=95)
    img = read_image(tmp_path / "x.jpg")
    assert img.shape == (300, 400) and np.abs(img - g / 255).mean() < 0.01
    small, hw = load_square(tmp_path / "x.jpg", 64)  # decoded with a DCT-domain draft
    assert hw == (300, 400) and small.shape == (64, 64)
    np.testing.assert_allclose(small, fit_square(img, 64), atol=0.03)


def test_fit_square_pads_the_short_side_and_never_crops():
    portrait = np.ones((120, 60), np.float32)
    out = fit_square(portrait, 32)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert out[:, :8].max() == 0 and out[:, -8:].max() == 0  # black pad left and right
    assert out[:, 9:23].min() == pytest.approx(1.0)  # the whole height is image
    assert np.allclose(fit_square(np.full((50, 50), 0.3, np.float32), 10), 0.3)
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    down = fit_square(ramp, 16)
    assert 0 <= down.min() and down.max() <= 1 and np.all(np.diff(down[0]) > 0)


def test_square_transform_maps_boxes_like_the_image():
    img = np.zeros((100, 200), np.float32)
    img[40:60, 100:140] = 1
    out = fit_square(img, 50)
    s, dx, dy = square_transform(100, 200, 50)
    x0, y0, x1, y1 = 100 * s + dx, 40 * s + dy, 140 * s + dx, 60 * s + dy
    ys, xs = np.nonzero(out > 0.5)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (x0, x1, y0, y1)


def test_fit_square_mask_is_binary():
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 5:9] = 1
    out = fit_square_mask(m, 16)
    assert set(np.unique(out)) <= {0.0, 1.0} and out.sum() == pytest.approx(m.sum() / 16, 0.5)


def test_bad_image_files(tmp_path):
    g = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "ok.png")
    Image.fromarray(g).save(tmp_path / "ok.jpg")
    png, jpg = (tmp_path / "ok.png").read_bytes(), (tmp_path / "ok.jpg").read_bytes()
    cases = {
        "trunc.png": png[: len(png) // 2],
        "trunc.jpg": jpg[: len(jpg) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "empty.jpg": b"",
        "text.png": b"not an image at all",
    }
    # A valid PNG header (IHDR with its CRC) claiming 100000 x 100000 pixels.
    big = bytearray(png)
    big[16:24] = (100000).to_bytes(4, "big") * 2
    big[29:33] = zlib.crc32(bytes(big[12:29])).to_bytes(4, "big")
    cases["huge.png"] = bytes(big)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value), name
    assert "absurd dimensions" in _error(tmp_path / "huge.png")
    assert "file not found" in _error(tmp_path / "absent.png")


def _error(path) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    return str(info.value)
