"""The two exceptions of the data layer: one for a file that cannot be decoded, one for a dataset
whose metadata (CSV, lists, folder layout) is malformed. Both are ``ValueError`` subclasses and
their messages name the file and the problem.
"""

from __future__ import annotations


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
