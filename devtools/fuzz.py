"""A mutation campaign over the readers: ``python -m devtools.fuzz --n 2000``.

::

    python -m devtools.fuzz [--n 2000] [--csv 300] [--seed 0] [--out DIR] [--no-real]

**Seeds.** Valid files written here: PNG 8- and 16-bit, JPEG, and DICOM uncompressed (8-,
12- and 16-bit, signed, implicit VR, deflated), JPEG Baseline, JPEG 2000, RLE (8- and 16-bit),
MONOCHROME1 and MONOCHROME2, with a window, a rescale, a VOI LUT and none; plus, when
``pydicom-data`` is installed, the real CR radiograph RG1 in its four encodings.

**Mutations** (:func:`mutate`): bit flips and byte overwrites, truncation at every structural
boundary (PNG chunks, JPEG markers, DICOM elements and pixel-data fragments) and at random,
inserted, deleted and duplicated slices, length fields set to 0 or 2^32 - 1; DICOM headers
that lie (Rows/Columns up to 65535 x 65535, zero and negative sizes, BitsAllocated/BitsStored,
SamplesPerPixel, frames, photometric), wrong transfer syntax UIDs, absurd window, rescale (NaN,
inf) and LUT values, deleted elements, pixel data of the wrong length; PNG and JPEG frame
headers that lie (with valid checksums, so the decoder sees them).

**Verdicts.** Each input is read in a child process by every reader of a path
(:func:`~spcl_fast.data.images.load_square`, which is ``read_image`` -> ``read_dicom`` or
Pillow -> ``fit_square``, and for DICOM the header reader of RSNA's boxes). Expected: a float32
image in ``[0, 1]``, or an :class:`~spcl_fast.data.errors.ImageReadError` whose message names
the file ("rejected"). Unexpected: any other exception, a message without the file's path, a
read taking more than ``timeout`` seconds (the child is killed), a child that dies, or a peak
resident memory more than ``memory_mb`` above the child's own before the read. Every
``check_every`` inputs, and at the end, the child re-reads every seed: each must decode
bit-identically to the parent's first read of it (no decoder state survives a bad file).

**CSV campaign** (:func:`csv_campaign`): each dataset's metadata files with missing, extra,
renamed and reordered columns, BOMs, CRLF, quoting, duplicate ids, path escapes and absolute
paths, non-UTF-8 bytes, NUL bytes, blank, truncated and header-only files. Expected: a
dataset whose ids are unique, whose paths stay under its root and whose labels have the
documented values, or a :class:`~spcl_fast.data.errors.DataFormatError` naming the file.

The report (``<out>/report.json``) lists every input with its mutation and verdict, and the
unexpected ones are kept under ``<out>/unexpected/`` to reproduce. Exit status 1 if any input
was unexpected. What the campaign checks is summarised in ``docs/data.md`` ("Bad input").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import struct
import sys
import time
import zlib

import numpy as np

from spcl_fast.data.errors import DataFormatError, ImageReadError

SIZE = 64  # side of load_square's output in the campaign
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- seeds


@dataclasses.dataclass
class Seed:
    """A valid input file and what the mutations need to know about it."""

    name: str
    path: str
    kind: str  # "png", "jpeg" or "dicom"
    boundaries: list[int]  # byte offsets where a structure begins or ends


def write_seeds(folder, real: bool = True) -> list[Seed]:
    """Write the valid seed files into ``folder`` (and add pydicom-data's RG1 files when
    ``real`` and installed); returns them with their structural boundaries."""
    from PIL import Image
    from pydicom import uid
    from pydicom.uid import generate_uid

    from .fixtures import phantoms, write_dicom

    os.makedirs(folder, exist_ok=True)
    u8 = phantoms(1, 48, seed=3, noise=4.0)[0]
    u16 = u8.astype(np.uint16) * 257
    u12 = (u16 >> 4).astype(np.uint16)
    s12 = (u12.astype(np.int16) - 2048).astype(np.int16)
    paths = {}

    def pil(name, arr, **kwargs):
        paths[name] = os.path.join(folder, name)
        Image.fromarray(arr).save(paths[name], **kwargs)

    pil("png8.png", u8)
    pil("png16.png", u16)
    pil("photo.jpg", u8, quality=90)
    dicoms = {
        "explicit8.dcm": (u8, {}),
        "explicit12_window_rescale.dcm": (u12, dict(bits_stored=12, window=(1800, 3000),
                                                    rescale=(1.0, -100.0))),
        "explicit16_mono1.dcm": (u16, dict(photometric="MONOCHROME1")),
        "signed12.dcm": (s12, dict(bits_stored=12, signed=True)),
        "voilut_mono1.dcm": (u12, dict(bits_stored=12, photometric="MONOCHROME1",
                                       voi_lut=(0, 8, [v >> 4 for v in range(4096)]))),
        "implicit.dcm": (u8, dict(transfer_syntax=uid.ImplicitVRLittleEndian)),
        "deflated.dcm": (u12, dict(bits_stored=12,
                                   transfer_syntax=uid.DeflatedExplicitVRLittleEndian)),
        "rle8.dcm": (u8, dict(transfer_syntax=uid.RLELossless)),
        "rle16_window.dcm": (u16, dict(transfer_syntax=uid.RLELossless, window=(30000, 40000))),
        "jpeg_baseline.dcm": (u8, dict(transfer_syntax=uid.JPEGBaseline8Bit)),
        "j2k12_mono1.dcm": (u12, dict(bits_stored=12, transfer_syntax=uid.JPEG2000Lossless,
                                      photometric="MONOCHROME1")),
    }
    for name, (arr, kwargs) in dicoms.items():  # fixed UIDs: the same bytes in every campaign
        # (the module's former name: kept so that the seed files stay the same bytes)
        uid_of_name = generate_uid(entropy_srcs=["spcl_fast.data.fuzz", name])
        paths[name] = write_dicom(os.path.join(folder, name), arr, instance_uid=uid_of_name,
                                  **kwargs)
    if real:
        paths.update(_real_files())
    return [Seed(name, path, _kind(path), _boundaries(path)) for name, path in paths.items()]


def _real_files() -> dict[str, str]:
    """pydicom-data's RG1 (a real MONOCHROME1 CR chest film, 1955 x 1841), when installed."""
    try:
        import data_store
    except ImportError:
        return {}
    root = os.path.join(os.path.dirname(data_store.__file__), "data")
    names = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm")
    return {n: os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))}


def _kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(132)
    if head.startswith(_PNG_MAGIC):
        return "png"
    return "jpeg" if head.startswith(b"\xff\xd8") else "dicom"


def _boundaries(path: str) -> list[int]:
    with open(path, "rb") as f:
        data = f.read()
    kind = _kind(path)
    if kind == "png":
        cuts, p = [8], 8
        while p + 8 <= len(data):
            (length,) = struct.unpack(">I", data[p:p + 4])
            cuts += [p + 8, p + 8 + length, p + 12 + length]  # type, data, crc
            p += 12 + length
        return sorted(set(c for c in cuts if c <= len(data)))
    if kind == "jpeg":
        return sorted({k for k in range(len(data) - 1)
                       if data[k] == 0xFF and data[k + 1] not in (0x00, 0xFF)})
    return _dicom_boundaries(data)


def _dicom_boundaries(data: bytes) -> list[int]:
    """Starts and ends of every top-level element, and the item tags inside encapsulated
    pixel data (the fragments)."""
    import pydicom
    from pydicom.filereader import data_element_generator

    cuts = {0, 128, 132}
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    implicit, little = ds.original_encoding
    fp = io.BytesIO(data)
    if ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return sorted(cuts | {len(data) // 2, len(data) - 1})  # the body is one zlib stream
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    cuts.add(fp.tell())
    for elem in data_element_generator(fp, implicit, little, defer_size=1):
        if not hasattr(elem, "value_tell"):  # a sequence, parsed: its start is known
            cuts.add(elem.file_tell)
            continue
        cuts.add(elem.value_tell)
        if elem.length != 0xFFFFFFFF:
            cuts.add(elem.value_tell + elem.length)
        if elem.tag == 0x7FE00010:
            start = elem.value_tell
            k = data.find(b"\xfe\xff\x00\xe0", start)
            while k != -1:
                cuts |= {k, k + 8}
                k = data.find(b"\xfe\xff\x00\xe0", k + 8)
            break
    return sorted(c for c in cuts if c <= len(data))


# ---------------------------------------------------------------- mutations


def _flip_bits(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    buf, k = bytearray(data), rng.choice([1, 1, 2, 4, 16])
    for _ in range(k):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf), f"flip {k} bits"


def _overwrite(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    buf, k = bytearray(data), rng.randint(1, 8)
    for _ in range(k):
        buf[rng.randrange(len(buf))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(buf), f"overwrite {k} bytes"


def _truncate_at_boundary(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    cut = min(len(data), max(0, rng.choice(seed.boundaries) + rng.choice([0, 0, 0, -1, 1, 3])))
    return data[:cut], f"truncate at byte {cut} (a structure boundary)"


def _truncate_anywhere(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.randrange(len(data))
    return data[:cut], f"truncate at byte {cut}"


def _splice(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 512))
    how = rng.choice(["delete", "duplicate", "insert"])
    if how == "delete":
        return data[:a] + data[b:], f"delete bytes {a}:{b}"
    if how == "duplicate":
        return data[:b] + data[a:b] + data[b:], f"duplicate bytes {a}:{b}"
    junk = bytes(rng.randrange(256) for _ in range(b - a))
    return data[:a] + junk + data[a:], f"insert {b - a} random bytes at {a}"


def _length_field(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    """4 bytes at a structure boundary (where lengths live) set to an extreme."""
    at = rng.choice([b for b in seed.boundaries if b + 4 <= len(data)] or [0])
    value = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\x00\x00",
                        b"\x00\x00\xff\x7f"])
    return data[:at] + value + data[at + 4:], f"bytes {at}:{at + 4} = {value.hex()}"


_BYTE_MUTATIONS = (_flip_bits, _overwrite, _truncate_at_boundary, _truncate_anywhere, _splice,
                   _length_field)

# DICOM header lies: keyword -> values (a negative value is written with VR SS).
_DICOM_LIES = {
    "Rows": [0, 1, 2, 47, 49, 4096, 65535, -1],
    "Columns": [0, 1, 47, 49, 65535, -1],
    "BitsAllocated": [0, 1, 7, 12, 24, 32, 64, 65535],
    "BitsStored": [0, 1, 7, 17, 33, 65535],
    "HighBit": [0, 6, 64, 65535],
    "SamplesPerPixel": [0, 2, 3, 4, 65535],
    "PixelRepresentation": [1, 2, 65535],
    "PlanarConfiguration": [1, 2],
    "NumberOfFrames": ["0", "-1", "2", "1000000", "99999999999", "abc"],
    "PhotometricInterpretation": ["", "MONOCHROME3", "PALETTE COLOR", "RGB", "YBR_FULL",
                                  "monochrome2"],
    "RescaleSlope": ["NaN", "inf", "-inf", "0", "-1", "1e308", "1e-308", "abc"],
    "RescaleIntercept": ["NaN", "inf", "-1e308", "1e308"],
    "WindowCenter": ["NaN", "inf", "-1e308", "1e308", ["1", "2"], "abc"],
    "WindowWidth": ["NaN", "inf", "0", "-1", "1e-30", "1e308", ["1", "2"]],
    "VOILUTFunction": ["SIGMOID", "LINEAR_EXACT", "BOGUS"],
}
_LUT_DESCRIPTORS = [[0, 0, 16], [65535, 0, 16], [4, 65535, 8], [4, 0, 0], [4, 0, 40], [1, 0, 8],
                    [256, 32768, 16]]
_LUT_DATA = [[], [65535] * 5, [0] * 4, list(range(256)), [0, 65535]]
_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
    "1.2.3.4", "", "garbage",
]
_DELETABLE = ["PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored",
              "PhotometricInterpretation", "SamplesPerPixel", "PixelRepresentation"]


@contextlib.contextmanager
def _lenient_pydicom():
    """pydicom settings that let invalid values be written (the point of a lie)."""
    import warnings

    from pydicom import config

    old = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.writing_validation_mode, config.settings.reading_validation_mode = old


def _dicom_edit(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    with _lenient_pydicom():
        ds = pydicom.dcmread(io.BytesIO(data))
        kind = rng.choice(["lie", "lie", "lie", "lut", "delete", "pixels"])
        if kind == "lie" and rng.random() < 0.15:  # both sides at once, up to the limit
            ds.Rows, ds.Columns = rng.choice([(65535, 65535), (0, 0), (8192, 8192),
                                              (8193, 8192), (1, 65535)])
            what = f"Rows x Columns = {ds.Rows} x {ds.Columns}"
        elif kind == "lie":
            keyword = rng.choice(list(_DICOM_LIES))
            value = rng.choice(_DICOM_LIES[keyword])
            tag = pydicom.datadict.tag_for_keyword(keyword)
            if isinstance(value, int) and value < 0:
                ds[tag] = DataElement(tag, "SS", value)
            else:
                try:
                    setattr(ds, keyword, value)
                except ValueError:  # not even a number ("abc" as IS): a wrong VR carries it
                    ds[tag] = DataElement(tag, "LO", value)
            what = f"{keyword} = {value!r}"
        elif kind == "lut":
            item = Dataset()
            descriptor, values = rng.choice(_LUT_DESCRIPTORS), rng.choice(_LUT_DATA)
            item.add_new("LUTDescriptor", "US", descriptor)
            item.add_new("LUTData", "US", values)
            which = rng.choice(["VOILUTSequence", "ModalityLUTSequence"])
            setattr(ds, which, Sequence([item]))
            what = f"{which} descriptor {descriptor}, {len(values)} values"
        elif kind == "delete":
            keyword = rng.choice(_DELETABLE)
            if keyword in ds:
                delattr(ds, keyword)
            what = f"delete {keyword}"
        elif ds.file_meta.TransferSyntaxUID.is_compressed:
            from pydicom.encaps import encapsulate, generate_frames

            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            parts = rng.choice([[frame[: len(frame) // 2]], [frame, frame], [frame[:1]],
                                [frame[: len(frame) - 1]]])
            ds.PixelData = encapsulate(parts)
            what = f"encapsulated frames of {[len(f) for f in parts]} bytes, not {len(frame)}"
        else:
            pixels = ds.PixelData
            new = rng.choice([b"", pixels[: len(pixels) // 2], pixels + pixels, pixels[:-1],
                              pixels[:-2]])
            ds.PixelData = new
            what = f"pixel data of {len(new)} bytes instead of {len(pixels)}"
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds)
    return out.getvalue(), what


def _transfer_syntax(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    """Replace the Transfer Syntax UID's bytes in the file meta (pydicom would refuse to
    write most of these lies)."""
    import pydicom

    old = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
              .file_meta.TransferSyntaxUID)
    new = rng.choice([t for t in _TRANSFER_SYNTAXES if t != old])
    raw_old = old.encode() + b"\0" * (len(old) % 2)
    raw_new = new.encode() + b"\0" * (len(new) % 2)
    at = data.find(b"\x02\x00\x10\x00UI")
    if at < 0:
        return data, "transfer syntax left (no explicit file meta)"
    start = at + 8
    value = data[start:start + len(raw_old)]
    if value != raw_old:
        return data, "transfer syntax left (unexpected layout)"
    head = data[:at + 6] + struct.pack("<H", len(raw_new))
    return head + raw_new + data[start + len(raw_old):], f"transfer syntax {old} -> {new!r}"


def _png_header(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    """IHDR fields that lie, with a recomputed CRC so the decoder acts on them."""
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    field = rng.choice(["width", "height", "both", "depth", "colour"])
    big = rng.choice([0, 1, 65535, 2**31 - 1, 2**31, 2**32 - 1, width + 1])
    if field == "width":
        width = big
    elif field == "height":
        height = big
    elif field == "both":
        width = height = rng.choice([65535, 2**31 - 1, 0])
    elif field == "depth":
        depth = rng.choice([0, 1, 2, 3, 16, 255])
    else:
        colour = rng.choice([1, 2, 3, 4, 5, 6, 7, 255])
    body = data[12:16] + struct.pack(">IIBB", width, height, depth, colour) + data[26:29]
    crc = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return (data[:12] + body + crc + data[33:],
            f"IHDR {width}x{height}, depth {depth}, colour type {colour}")


def _jpeg_header(data: bytes, seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    """Frame header (SOF0) fields that lie: height, width, precision, components."""
    at = data.find(b"\xff\xc0")
    if at < 0:
        return data, "frame header left (none found)"
    buf = bytearray(data)
    field = rng.choice(["height", "width", "precision", "components"])
    if field in ("height", "width"):
        value = rng.choice([0, 1, 65535, 8193])
        struct.pack_into(">H", buf, at + 5 + (field == "width") * 2, value)
    else:
        value = rng.choice([0, 1, 12, 16, 255] if field == "precision" else [0, 2, 3, 255])
        buf[at + 4 if field == "precision" else at + 9] = value
    return bytes(buf), f"SOF0 {field} = {value}"


def mutate(seed: Seed, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of ``data`` (the bytes of ``seed``), chosen by ``rng``: the new bytes
    and a description (``"<family>: <what>"``)."""
    family = {"dicom": [_dicom_edit, _dicom_edit, _transfer_syntax],
              "png": [_png_header], "jpeg": [_jpeg_header]}[seed.kind]
    fn = rng.choice(list(_BYTE_MUTATIONS) + family * 2)
    out, what = fn(data, seed, rng)
    return out, f"{fn.__name__.lstrip('_')}: {what}"


# ---------------------------------------------------------------- the reading child


def _peak_mb_reset() -> bool:
    """Reset this process's peak RSS (Linux: /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB."""
    if os.path.exists("/proc/self/status"):
        return _status_mb("VmRSS"), _status_mb("VmHWM")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak, peak


def _digest(img: np.ndarray) -> str:
    return hashlib.sha256(repr(img.shape).encode() + img.tobytes()).hexdigest()


def read_all(path: str) -> None:
    """Every path reader on ``path``; returns if each gave a well-formed image (float32 in
    ``[0, 1]``, header size equal to the image's), raises ``AssertionError`` if one did not,
    and lets every reader's exception through (``ImageReadError`` is the expected one)."""
    from spcl_fast.data.dicom import is_dicom
    from spcl_fast.data.images import load_square
    from spcl_fast.data.rsna import _dicom_size

    img, hw = load_square(path, SIZE)
    ok = (img.dtype == np.float32 and img.shape == (SIZE, SIZE) and np.isfinite(img).all()
          and img.min() >= 0 and img.max() <= 1 and min(hw) >= 1)
    if not ok:
        raise AssertionError(f"malformed image: {img.dtype} {img.shape} from {hw}")
    if is_dicom(path):
        h, w = _dicom_size(path)
        if (h, w) != tuple(hw):
            raise AssertionError(f"header size {h}x{w}, image {hw}")


def _child(conn, seeds: list[tuple[str, str]]) -> None:
    import warnings

    from spcl_fast.data.images import read_image

    warnings.simplefilter("ignore")  # pydicom's warnings on odd headers: verdicts are the output
    resettable = _peak_mb_reset()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if msg[0] == "check":
            conn.send({n: _digest(read_image(p)) for n, p in seeds})
            continue
        path = msg[1]
        before, _ = _rss_mb()
        if resettable:
            _peak_mb_reset()
        start = time.monotonic()
        try:
            read_all(path)
            message, verdict = None, "read"
        except ImageReadError as exc:
            message = str(exc)
            verdict = "rejected" if path in message else "unexpected"
        except BaseException as exc:  # noqa: BLE001 - everything else is the finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            message, verdict = f"{type(exc).__name__}: {exc}"[:500], "unexpected"
        seconds = time.monotonic() - start
        _, peak = _rss_mb()
        conn.send({"verdict": verdict, "message": message, "seconds": round(seconds, 4),
                   "peak_mb": round(max(0.0, peak - before), 1)})


class _Reader:
    """A child process that reads files on request; replaced when it hangs or dies."""

    def __init__(self, seeds: list[Seed]):
        self.seeds = [(s.name, s.path) for s in seeds]
        self.proc = None
        self.start()

    def start(self) -> None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, self.seeds), daemon=True)
        self.proc.start()
        child.close()

    def ask(self, msg, timeout: float):
        """The child's answer, or ``("hang", None)`` / ``("crash", exitcode)``."""
        try:
            self.conn.send(msg)
            if self.conn.poll(timeout):
                return "ok", self.conn.recv()
            answer = ("hang", None)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.proc.join(5)  # the pipe closed as the child exited: wait for its status
            answer = ("crash", self.proc.exitcode)
        self.proc.kill()
        self.proc.join()
        self.start()
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ---------------------------------------------------------------- campaigns


def run_campaign(n: int, out, seed: int = 0, real: bool = True, timeout: float = 10.0,
                 memory_mb: float = 1024.0, check_every: int = 100, keep: bool = False,
                 progress: bool = False) -> dict:
    """Mutate the seeds ``n`` times and read every result (module docstring).

    Args:
        n: number of mutated inputs.
        out: work folder (seeds, inputs, ``report.json``, ``unexpected/``).
        seed: the campaign's seed; input ``i`` is mutated by ``random.Random(f"{seed}:{i}")``,
            so any single input can be regenerated.
        real: include pydicom-data's real radiographs among the seeds when installed.
        timeout: seconds a read may take before it counts as a hang.
        memory_mb: allowed peak RSS growth of the reading process per input, in MiB.
        check_every: re-read the seeds every this many inputs.
        keep: keep every mutated input under ``out/inputs`` (default: only the unexpected).

    Returns the report: ``{"inputs", "read", "rejected", "unexpected", "by_seed",
    "by_mutation", "max_seconds", "max_peak_mb", "seconds", "cases": [...]}``.
    """
    from spcl_fast.data.images import read_image

    out = os.fspath(out)
    seeds = write_seeds(os.path.join(out, "seeds"), real=real)
    reference = {s.name: _digest(read_image(s.path)) for s in seeds}
    blobs = {s.name: open(s.path, "rb").read() for s in seeds}
    inputs = os.path.join(out, "inputs")
    os.makedirs(inputs, exist_ok=True)
    # Real files are large and slow to decode: a share of the inputs, not one in every four.
    weights = [1 if s.name.startswith("RG") else 4 for s in seeds]
    cases, reader, began = [], _Reader(seeds), time.monotonic()
    try:
        for i in range(n):
            rng = random.Random(f"{seed}:{i}")
            s = rng.choices(seeds, weights)[0]
            data, what = mutate(s, blobs[s.name], rng)
            ext = os.path.splitext(s.path)[1]
            path = os.path.join(inputs, f"{i:05d}-{os.path.splitext(s.name)[0]}{ext}")
            with open(path, "wb") as f:
                f.write(data)
            case = {"index": i, "seed": s.name, "mutation": what, "path": path}
            status, answer = reader.ask(("read", path), timeout)
            if status == "ok":
                case.update(answer)
                if answer["peak_mb"] > memory_mb:
                    case["verdict"] = "unexpected"
                    case["message"] = f"peak memory +{answer['peak_mb']} MiB > {memory_mb}"
            else:
                what = f"hang (> {timeout} s)" if status == "hang" else f"crash (exit {answer})"
                case.update(verdict="unexpected", message=what, seconds=None, peak_mb=None)
            if (i + 1) % check_every == 0 or i == n - 1:
                _check_seeds(reader, reference, timeout * len(seeds), case)
            if case["verdict"] == "unexpected":
                os.makedirs(os.path.join(out, "unexpected"), exist_ok=True)
                shutil.copy(path, os.path.join(out, "unexpected", os.path.basename(path)))
            if not keep:
                os.remove(path)
            cases.append(case)
            if progress and (i + 1) % 100 == 0:
                print(f"{i + 1}/{n} inputs, {sum(c['verdict'] == 'unexpected' for c in cases)}"
                      " unexpected", file=sys.stderr)
    finally:
        reader.close()
    report = _summary(cases, time.monotonic() - began)
    report["seeds"] = [s.name for s in seeds]
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _check_seeds(reader: _Reader, reference: dict, timeout: float, case: dict) -> None:
    """Re-read the seeds in the child; a difference makes ``case`` (the input just read)
    unexpected."""
    status, digests = reader.ask(("check",), timeout)
    if status != "ok":
        changed = [f"seed re-read: {status}"]
    else:
        changed = [name for name, d in digests.items() if d != reference[name]]
    if changed:
        case["verdict"] = "unexpected"
        case["message"] = f"good files read differently after this input: {changed}"


def _summary(cases: list[dict], seconds: float) -> dict:
    def counts(key):
        table = {}
        for c in cases:
            row = table.setdefault(c[key] if key == "seed" else c[key].split(":")[0],
                                   {"read": 0, "rejected": 0, "unexpected": 0})
            row[c["verdict"]] += 1
        return dict(sorted(table.items()))

    timed = [c for c in cases if c.get("seconds") is not None]
    return {
        "inputs": len(cases),
        **{v: sum(c["verdict"] == v for c in cases) for v in ("read", "rejected", "unexpected")},
        "by_seed": counts("seed"), "by_mutation": counts("mutation"),
        "max_seconds": max((c["seconds"] for c in timed), default=0.0),
        "max_peak_mb": max((c["peak_mb"] for c in timed), default=0.0),
        "seconds": round(seconds, 1),
        "cases": cases,
    }


# ---------------------------------------------------------------- CSV campaign


def _csv_mutations(header: list[str], rows: list[list[str]], rng: random.Random,
                   write_header: bool = True) -> tuple[bytes, str]:
    """One malformed version of a CSV (given parsed): its bytes and a description. A list
    file has no header line: give its one column a name and ``write_header=False``."""
    rows = [list(r) for r in rows]
    kind = rng.choice(["drop", "rename", "extra", "reorder", "bom", "crlf", "quote", "duplicate",
                       "escape", "absolute", "latin1", "nul", "empty", "header_only",
                       "truncate", "blank_lines", "short_row", "long_field", "tabs", "spaces"])
    col = rng.randrange(len(header))
    what = ""
    if kind == "drop":
        what = f"column {header[col]!r}"
        header, rows = header[:col] + header[col + 1:], [r[:col] + r[col + 1:] for r in rows]
    elif kind == "rename":
        new = rng.choice([header[col].upper(), header[col] + "_x", header[col].replace(" ", "_"),
                          ""])
        what, header = f"{header[col]!r} to {new!r}", header[:col] + [new] + header[col + 1:]
    elif kind == "extra":
        header, rows = header + ["Extra"], [r + ["x"] for r in rows]
    elif kind == "reorder":
        order = list(range(len(header)))
        rng.shuffle(order)
        header, rows = [header[k] for k in order], [[r[k] for k in order] for r in rows]
    elif kind == "duplicate" and rows:
        rows.append(list(rng.choice(rows)))
    elif kind in ("escape", "absolute") and rows:
        r = rng.choice(rows)
        r[0] = ("../" * rng.randint(1, 4) + os.path.basename(r[0]) if kind == "escape"
                else "/etc/passwd" if rng.random() < 0.5 else os.path.abspath(r[0]))
        what = repr(r[0])
    elif kind == "short_row" and rows:
        rng.choice(rows)[-1:] = []
    elif kind == "long_field" and rows:
        rng.choice(rows)[rng.randrange(len(header))] = "x" * 100_000
    elif kind == "spaces" and rows:
        rows = [[f"  {c} " for c in r] for r in rows]
    text = io.StringIO()
    quoting = csv.QUOTE_ALL if kind == "quote" else csv.QUOTE_MINIMAL
    writer = csv.writer(text, delimiter="\t" if kind == "tabs" else ",", quoting=quoting,
                        lineterminator="\r\n" if kind == "crlf" else "\n")
    if write_header:
        writer.writerow(header)
    if kind != "header_only":
        writer.writerows(rows)
    data = text.getvalue().encode()
    if kind == "blank_lines":
        data = data.replace(b"\n", b"\n\n")
    elif kind == "bom":
        data = b"\xef\xbb\xbf" + data
    elif kind == "latin1":
        at = rng.randrange(len(data) + 1)
        data = data[:at] + rng.choice([b"\xe9", b"\xff\xfe", b"\x80"]) + data[at:]
    elif kind == "nul":
        at = rng.randrange(len(data) + 1)
        data = data[:at] + b"\0" + data[at:]
    elif kind == "empty":
        data = b""
    elif kind == "truncate":
        data = data[:rng.randrange(len(data) + 1)]
    return data, f"{kind}: {what}" if what else kind


def _csv_datasets(folder: str) -> dict[str, tuple[str, list[str]]]:
    """A tiny copy of each labelled layout: name -> (root, its metadata files)."""
    from .fixtures import make_chestxray14, make_chexpert, make_rsna, make_siim

    roots = {
        "chestxray14": (make_chestxray14(os.path.join(folder, "chestxray14"), n=9),
                        ["Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"]),
        "chexpert": (make_chexpert(os.path.join(folder, "chexpert"), n_train=6, n_valid=3),
                     ["train.csv", "valid.csv"]),
        "rsna": (make_rsna(os.path.join(folder, "rsna"), n=6), ["stage_2_train_labels.csv"]),
        "siim": (make_siim(os.path.join(folder, "siim"), n=6), ["train-rle.csv"]),
    }
    return roots


def _check_dataset(name: str, root: str) -> None:
    """Build ``name`` at ``root`` and check what a built dataset promises; raises
    AssertionError for a broken promise, and whatever the dataset raises."""
    import warnings

    from spcl_fast.data import build_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped files are listed in .skipped, as documented
        ds = build_dataset(name, root, "all", 32, on_error="skip")
        real_root = os.path.realpath(root)
        assert len(set(ds.ids)) == len(ds.ids), "duplicate ids"
        assert tuple(ds.labels.shape) == (len(ds), len(ds.class_names)), "labels shape"
        values = ds.labels[~ds.labels.isnan()]
        assert bool(((values == 0) | (values == 1)).all()), "labels other than 0/1/NaN"
        for p in ds.paths:
            assert os.path.realpath(p).startswith(real_root + os.sep), f"{p} outside {root}"
        if len(ds):
            ds[0]  # an item: decoding under the bad-file policy


def csv_campaign(n: int, out, seed: int = 0) -> dict:
    """``n`` malformed metadata files across the labelled layouts (module docstring).
    Returns ``{"inputs", "read", "rejected", "unexpected", "by_mutation", "cases"}``."""
    out = os.fspath(out)
    pristine = _csv_datasets(os.path.join(out, "pristine"))
    cases, began = [], time.monotonic()
    for i in range(n):
        rng = random.Random(f"csv:{seed}:{i}")
        name = rng.choice(sorted(pristine))
        src, files = pristine[name]
        target = rng.choice(files)
        root = os.path.join(out, "work", name)
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(src, root)
        path = os.path.join(root, target)
        with open(path, newline="", encoding="utf-8") as f:
            table = [row for row in csv.reader(f) if row]
        is_csv = target.endswith(".csv")  # else a list file: one name per line, no header
        table = table if is_csv else [["name"]] + table
        data, what = _csv_mutations(table[0], table[1:], rng, write_header=is_csv)
        with open(path, "wb") as f:
            f.write(data)
        case = {"index": i, "seed": f"{name}/{target}", "mutation": what}
        try:
            _check_dataset(name, root)
            case.update(verdict="read", message=None)
        except DataFormatError as exc:
            ok = path in str(exc) or root in str(exc)
            case.update(verdict="rejected" if ok else "unexpected", message=str(exc)[:500])
        except BaseException as exc:  # noqa: BLE001 - everything else is the finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            case.update(verdict="unexpected", message=f"{type(exc).__name__}: {exc}"[:500])
        if case["verdict"] == "unexpected":
            keep = os.path.join(out, "unexpected", f"{i:05d}-{name}")
            shutil.copytree(root, keep, dirs_exist_ok=True)
        cases.append(case)
    shutil.rmtree(os.path.join(out, "work"), ignore_errors=True)
    report = _summary([{**c, "seconds": None} for c in cases], time.monotonic() - began)
    del report["max_seconds"], report["max_peak_mb"]
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.fuzz",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="mutated image files")
    p.add_argument("--csv", type=int, default=300, help="malformed metadata files")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (input i is reproducible)")
    p.add_argument("--out", default="fuzz-report", help="work folder and report.json")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per read before a hang")
    p.add_argument("--memory-mb", type=float, default=1024.0,
                   help="allowed peak RSS growth per read (MiB)")
    p.add_argument("--no-real", action="store_true", help="leave out pydicom-data's files")
    a = p.parse_args(argv)
    if a.n < 0 or a.csv < 0 or a.timeout <= 0 or a.memory_mb <= 0:
        raise SystemExit("error: --n and --csv must be >= 0, --timeout and --memory-mb > 0")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise SystemExit(f"error: --out {a.out} is a file")
    images = run_campaign(a.n, a.out, a.seed, real=not a.no_real, timeout=a.timeout,
                          memory_mb=a.memory_mb, progress=True)
    tables = csv_campaign(a.csv, os.path.join(a.out, "csv"), a.seed)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump({"images": images, "csv": tables}, f, indent=1)
    for label, r in (("image files", images), ("metadata files", tables)):
        print(f"{label}: {r['inputs']} inputs, {r['read']} read, {r['rejected']} rejected "
              f"cleanly, {r['unexpected']} unexpected ({r['seconds']} s)")
    print(f"slowest read {images['max_seconds']} s, largest peak memory growth "
          f"{images['max_peak_mb']} MiB; report: {os.path.join(a.out, 'report.json')}")
    for c in (images["cases"] + tables["cases"]):
        if c["verdict"] == "unexpected":
            print(f"  unexpected: #{c['index']} {c['seed']} {c['mutation']}: {c['message']}")
    return 1 if images["unexpected"] or tables["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
