"""Decode any radiograph file (PNG, JPEG, DICOM, ...) to float32 ``[0, 1]`` and fit it to the
square the models see.

Intensity: 8-bit files are divided by 255, 16-bit PNG/TIFF by 65535, colour files (NIH ships
some RGB/RGBA PNGs) go to one luminance channel, DICOM goes through
:func:`~spcl_fast.data.dicom.read_dicom` (modality LUT, VOI/window, MONOCHROME1 inverted).

Aspect policy (:func:`fit_square`), the same for every dataset, the cache and masks: scale the
image so that its LONG side is ``S`` (antialiased bilinear), then pad the short side
symmetrically with black (0) to ``S x S``. Nothing is cropped (apices and costophrenic angles of
portrait films stay in view) and nothing is distorted; the pad looks like collimation, and
square sources (NIH, RSNA, SIIM: 1024 x 1024) are simply resized. Masks follow the same
geometry, resized as float and thresholded at 0.5. Boxes map with :func:`square_transform`.

Every failure raises :class:`~spcl_fast.data.errors.ImageReadError` naming the file: missing,
truncated or corrupt files, unknown formats, and headers claiming more than ``MAX_PIXELS``
pixels (checked before anything is decoded).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .dicom import MAX_PIXELS, _describe, is_dicom, read_dicom
from .errors import ImageReadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


def _read_pillow(path, draft: int | None, max_pixels: int) -> tuple[np.ndarray, tuple]:
    name = os.fspath(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w < 1 or h < 1 or w * h > max_pixels:
                raise ImageReadError(f"{name}: absurd dimensions {h}x{w} "
                                     f"(limit {max_pixels} pixels)")
            if draft and im.format == "JPEG":
                # DCT-domain downscale while decoding (both sides stay >= draft): a big JPEG
                # decodes several times faster and loses nothing at the final size.
                im.draft("L", (draft, draft))
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return np.asarray(im, np.float32) * np.float32(1 / 65535), (h, w)
            if im.mode == "I":  # 16-bit PNGs open as "I" in recent Pillow
                arr = np.asarray(im, np.float32) * np.float32(1 / 65535)
                return np.clip(arr, 0.0, 1.0, out=arr), (h, w)
            if im.mode == "F":
                return np.clip(np.asarray(im, np.float32), 0.0, 1.0), (h, w)
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im, np.float32) * np.float32(1 / 255), (h, w)
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(f"{name}: file not found") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name}: absurd dimensions ({_describe(exc)})") from exc
    except Exception as exc:  # truncated/corrupt streams raise OSError, SyntaxError, zlib.error
        raise ImageReadError(f"{name}: cannot decode image ({_describe(exc)})") from exc


def read_image_with_size(path, draft: int | None = None,
                         max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`read_image`, also returning the file's original ``(H, W)``. With ``draft``,
    JPEGs may come back downscaled (both sides still >= ``draft``); the size returned is the
    original one either way."""
    if not os.path.isfile(path):
        raise ImageReadError(f"{os.fspath(path)}: file not found")
    if is_dicom(path):
        img = read_dicom(path, max_pixels=max_pixels)
        return img, img.shape
    return _read_pillow(path, draft, max_pixels)


def read_image(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one radiograph file to float32 ``(H, W)`` in ``[0, 1]``.

    DICOM is recognised by extension (``.dcm``/``.dicom``) or by its ``DICM`` magic, anything
    else goes through Pillow. Raises :class:`ImageReadError` naming the file on any failure.

    Example::

        >>> import tempfile, numpy as np; from PIL import Image
        >>> path = tempfile.mkdtemp() + "/x.png"
        >>> Image.fromarray(np.full((4, 6), 255, np.uint8)).save(path)
        >>> img = read_image(path)
        >>> img.shape, img.dtype, float(img.max())
        ((4, 6), dtype('float32'), 1.0)
    """
    return read_image_with_size(path, max_pixels=max_pixels)[0]


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape == (h, w):
        return img
    # Pillow's bilinear widens its kernel when shrinking (area-aware, no aliasing) and, unlike
    # Lanczos, never overshoots [0, 1].
    out = Image.fromarray(np.ascontiguousarray(img, np.float32), mode="F")
    return np.asarray(out.resize((w, h), Image.Resampling.BILINEAR), np.float32)


def square_transform(h: int, w: int, size: int) -> tuple[float, float, float]:
    """Scale and offsets ``(s, dx, dy)`` of :func:`fit_square` for an ``(h, w)`` source: a
    source pixel coordinate ``(x, y)`` lands at ``(s * x + dx, s * y + dy)``."""
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return s, float((size - nw) // 2), float((size - nh) // 2)


def fit_square(img: np.ndarray, size: int) -> np.ndarray:
    """Fit float32 ``(H, W)`` into ``(size, size)``: long side scaled to ``size``, short side
    padded with zeros, centred (the module's aspect policy).

    Example::

        >>> fit_square(np.ones((100, 50), np.float32), 10)[0].round(3).tolist()
        [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    """
    h, w = img.shape
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = _resize(img, nh, nw)
    if (nh, nw) == (size, size):
        return np.clip(small, 0.0, 1.0)
    out = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.clip(small, 0.0, 1.0)
    return out


def fit_square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary ``(H, W)`` mask through :func:`fit_square`'s geometry, as float32 0/1."""
    return (fit_square(mask.astype(np.float32), size) >= 0.5).astype(np.float32)


def load_square(path, size: int, max_pixels: int = MAX_PIXELS
                ) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` and fit it to ``(size, size)``; returns the image and the source
    ``(H, W)``. The one raw-path entry of every dataset and of the cache builder."""
    img, hw = read_image_with_size(path, draft=size, max_pixels=max_pixels)
    return fit_square(img, size), (int(hw[0]), int(hw[1]))
