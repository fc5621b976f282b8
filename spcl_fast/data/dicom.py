"""The one DICOM reader of the library: any radiograph to float32 ``(H, W)`` in ``[0, 1]``,
displayed the way a viewer shows it (dark air, bright bone).

Pipeline (DICOM PS3.3 C.11 grayscale pipeline, through pydicom's own functions):

1. decode the stored values through pydicom's pixel-data handlers, so every transfer syntax a
   plugin supports works: uncompressed (implicit/explicit VR, little/big endian, deflated),
   RLE Lossless, JPEG Baseline/Extended/Lossless, JPEG-LS, JPEG 2000 (install the ``data``
   extra: ``pylibjpeg``, ``pylibjpeg-libjpeg``, ``pylibjpeg-openjpeg``, ``pylibjpeg-rle``);
2. modality LUT: Modality LUT Sequence, or Rescale Slope/Intercept (``apply_modality_lut``);
3. VOI: the VOI LUT Sequence if present, else the first Window Center/Width, with its VOI LUT
   Function (``apply_voi`` / ``apply_windowing``); an invalid window (width < 1, NaN or
   infinite values) is ignored;
4. normalise by the output range of the last step: the VOI LUT's bit depth, or else the range
   of the stored bit depth (``BitsStored``, signed or not) carried through the modality step,
   the range pydicom's windowing writes into; then clip to ``[0, 1]``;
5. MONOCHROME1 (bright = low values) is inverted, so every image is MONOCHROME2-like. A
   Presentation LUT Shape of INVERSE only restates MONOCHROME1 in DX/CR objects and is not
   applied a second time.

Colour images (RGB/YBR secondary captures) are converted to luminance; multi-frame files give
their first frame (``frame=`` picks another).

Privacy: only the pixel-module tags are parsed (``dcmread(specific_tags=...)``), so names,
ids, dates and institutions never reach memory, and error messages never quote header values.

Every failure (missing file, not DICOM, truncated, no pixel data, absurd dimensions, a codec
error or a decoder's panic, a missing decoder plugin, a NaN or infinite rescale) raises
:class:`~spcl_fast.data.errors.ImageReadError` whose message names the file and the problem.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np

from .errors import ImageReadError, is_decoder_failure

# Largest accepted frame: 8192 x 8192 (radiographs are at most ~4300 x 4300). A corrupt header
# claiming more would otherwise make the decoder allocate gigabytes.
MAX_PIXELS = 1 << 26
_MAX_BYTES = 1 << 31  # whole pixel data of a multi-frame file

_PIXEL_TAGS = [
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "FloatPixelData",
    "DoubleFloatPixelData", "PixelData",
]
_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def _name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return str(getattr(src, "name", "<stream>"))


def _describe(exc: BaseException) -> str:
    # Library messages can be long (and, for other tags, quote values): keep type + a prefix.
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def is_dicom(path: str | os.PathLike) -> bool:
    """True if ``path`` ends in ``.dcm``/``.dicom`` or has the ``DICM`` magic at byte 128."""
    if os.fspath(path).lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _int(ds, keyword, default=None):
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    return int(value)


def _check_geometry(ds, name: str, max_pixels: int, cut_off: bool) -> tuple[int, int, int]:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            what = "float pixel data (not a radiograph)"
        elif cut_off:  # force=True parsing drops an element that the end of the file cuts off
            what = "truncated (the file ends inside the pixel data)"
        else:
            what = "no pixel data"
        raise ImageReadError(f"{name}: {what}")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None or cols is None:
        raise ImageReadError(f"{name}: Rows/Columns missing")
    samples = _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1)
    bits = _int(ds, "BitsAllocated")
    stored = _int(ds, "BitsStored", bits)
    if rows < 1 or cols < 1 or frames < 1 or rows * cols > max_pixels:
        raise ImageReadError(
            f"{name}: absurd dimensions {rows}x{cols}x{frames} frames "
            f"(limit {max_pixels} pixels per frame)")
    if bits not in (1, 8, 16, 32) or stored is None or not 1 <= stored <= bits:
        raise ImageReadError(f"{name}: unsupported bit depth (allocated {bits}, stored {stored})")
    if samples not in (1, 3) or rows * cols * samples * frames * bits // 8 > _MAX_BYTES:
        raise ImageReadError(f"{name}: absurd pixel data size ({samples} samples x "
                             f"{frames} frames of {rows}x{cols} at {bits} bits)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONO + _COLOUR:
        raise ImageReadError(f"{name}: unsupported photometric interpretation {photometric!r}")
    if (samples == 1) != (photometric in _MONO):
        raise ImageReadError(f"{name}: {samples} samples per pixel with {photometric}")
    return frames, stored, samples


def _modality_range(ds, stored: int) -> tuple[float, float]:
    """Output range of the modality step for the full stored range: what pydicom's windowing
    maps onto (``apply_windowing``'s y_min/y_max), and the normaliser when there is no VOI."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    if _int(ds, "PixelRepresentation", 0) == 0:
        lo, hi = 0.0, float(2**stored - 1)
    else:
        lo, hi = float(-(2 ** (stored - 1))), float(2 ** (stored - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


def _finite_window(ds) -> bool:
    """Whether the first Window Center/Width pair is there and finite (a NaN or infinite one
    is ignored, as a width < 1 is)."""
    from pydicom.multival import MultiValue

    for keyword in ("WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        value = value[0] if isinstance(value, MultiValue) and len(value) else value
        try:
            if not math.isfinite(float(value)):
                return False
        except (TypeError, ValueError):  # absent, empty or not a number
            return False
    return True


def _grayscale(arr: np.ndarray, ds, stored: int, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    # Without a modality transform keep the integer array (fast path for 8-bit files).
    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        arr = apply_modality_lut(arr, ds)
    lo, hi = _modality_range(ds, stored)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ImageReadError(f"{name}: non-finite rescale (a NaN or infinite slope or "
                             "intercept, or one that overflows)")
    voi = ds.get("VOILUTSequence")
    if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
        if not np.issubdtype(arr.dtype, np.integer):
            arr = np.rint(arr).astype(np.int64)  # LUT input must be integral (PS3.3 C.11.2.1.1)
        arr = apply_voi(arr, ds, 0)
        lo, hi = 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
    elif _finite_window(ds):
        try:
            arr = apply_windowing(arr, ds, 0)
        except ValueError:
            pass  # width < 1 or an unknown VOI LUT Function: show the stored range instead
    if hi == lo:
        raise ValueError("empty output range")
    out = (arr.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        np.subtract(np.float32(1.0), out, out=out)
    return out


def read_dicom(path, frame: int = 0, max_pixels: int = MAX_PIXELS, plugin: str = "") -> np.ndarray:
    """Read one DICOM radiograph as displayed: float32 ``(H, W)`` in ``[0, 1]``.

    Args:
        path: file path (str or PathLike) or a binary file object.
        frame: which frame of a multi-frame file (default the first).
        max_pixels: frames with more pixels are rejected as absurd before decoding.
        plugin: force one pydicom decoding plugin (``"pylibjpeg"``, ...); default: any.

    Raises:
        ImageReadError: for any file that cannot be turned into an image; the message names
            the file and the problem and quotes no header value.

    Example::

        >>> from pydicom.data import get_testdata_file
        >>> img = read_dicom(get_testdata_file("MR_small.dcm"))  # shipped with pydicom
        >>> img.shape, img.dtype, bool(0 <= img.min() <= img.max() <= 1)
        ((64, 64), dtype('float32'), True)
    """
    import pydicom
    from pydicom.pixels import pixel_array

    name = _name(path)
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise ImageReadError(f"{name}: file not found")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # pydicom warns on oddities we check ourselves
            ds = pydicom.dcmread(path, force=True, specific_tags=_PIXEL_TAGS)
            if "PixelData" in ds and "TransferSyntaxUID" not in ds.file_meta:
                # No file meta (old files, force=True): use the encoding the parser found.
                implicit, little = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian if implicit
                    else pydicom.uid.ExplicitVRLittleEndian if little
                    else pydicom.uid.ExplicitVRBigEndian)
    except Exception as exc:  # any parser failure is "not a readable DICOM"
        raise ImageReadError(f"{name}: not a readable DICOM file ({_describe(exc)})") from exc
    try:
        cut_off = any("End of file" in str(w.message) for w in caught)
        frames, stored, samples = _check_geometry(ds, name, max_pixels, cut_off)
        if not 0 <= frame < frames:
            raise ImageReadError(f"{name}: frame {frame} out of range ({frames} frames)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=frame if frames > 1 else None, decoding_plugin=plugin)
        if arr.shape[:2] != (_int(ds, "Rows"), _int(ds, "Columns")):
            raise ValueError(f"decoded shape {arr.shape} does not match Rows x Columns")
        if samples == 3:  # colour capture: luminance, normalised by the stored depth
            rgb = arr.astype(np.float32) * np.float32(1.0 / (2**stored - 1))
            out = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
            return np.clip(out, 0.0, 1.0, out=out)
        return _grayscale(arr, ds, stored, name)
    except ImageReadError:
        raise
    except BaseException as exc:  # codec errors and panics, truncated data, plugins, bad LUTs
        if not is_decoder_failure(exc):
            raise
        short = cut_off or _short_pixels(ds)
        what = "truncated (fewer pixel bytes than the image needs)" if short \
            else "cannot decode pixel data"
        raise ImageReadError(f"{name}: {what} ({_describe(exc)})") from exc


def _short_pixels(ds) -> bool:
    """Whether uncompressed pixel data holds fewer bytes than Rows x Columns x samples x frames
    at the allocated depth (a file cut off inside the element)."""
    try:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return False
        need = (_int(ds, "Rows") * _int(ds, "Columns") * _int(ds, "SamplesPerPixel", 1)
                * _int(ds, "NumberOfFrames", 1) * _int(ds, "BitsAllocated") // 8)
        return len(ds.PixelData) < need
    except Exception:  # a header too broken to tell: the decoder's message stands
        return False
