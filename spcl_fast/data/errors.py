"""The two exceptions of the data layer: one for a file that cannot be decoded, one for a dataset
whose metadata (CSV, lists, folder layout) is malformed. Both are ``ValueError`` subclasses and
their messages name the file and the problem.
"""

from __future__ import annotations


def is_decoder_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised while decoding a file, says that the file is bad: any
    ``Exception``, and the panic of a Rust extension built with pyo3 (``PanicException``, a
    ``BaseException``; pylibjpeg-rle panics on some corrupt RLE streams). Never
    KeyboardInterrupt, SystemExit or asyncio's CancelledError: those must stop the caller."""
    kind = type(exc)
    return isinstance(exc, Exception) or (
        kind.__module__ == "pyo3_runtime" and kind.__name__ == "PanicException")


class ImageReadError(ValueError):
    """An image file (PNG, JPEG, DICOM) is missing, truncated, corrupt, has no pixel data or
    absurd dimensions. The message is ``"<path>: <problem>"`` and never holds DICOM header
    values (no names, ids, dates or institutions)."""


class DataFormatError(ValueError):
    """A dataset's metadata is malformed: a CSV without a required column, an unparseable row,
    a path that escapes the dataset root, a required list file that is absent."""


def one_line(exc: BaseException) -> str:
    """An exception's message in one line. Raised in a DataLoader worker, the message carries
    the worker's traceback: keep its last line, without the exception's class name."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
