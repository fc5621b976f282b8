"""What every real dataset shares: split selection, missing-file policy, the raw and the cached
read paths, the bad-file policy, and the CSV / path helpers that turn malformed metadata into
clear errors.

A subclass parses its official layout into an :class:`Index` (all rows of the release, with a
split name per row) and, where it has one, decodes a mask; this class does the rest.

Bad input, in one place:

* a file listed but absent: ``missing="skip"`` (default) drops it at construction and records
  it in ``ds.skipped`` (id -> reason) with one warning; ``"raise"`` raises
  :class:`~spcl_fast.data.errors.ImageReadError`; ``"keep"`` does not look (reading it later
  fails like any bad file: what the cache builder uses);
* a file that cannot be decoded: ``on_error="raise"`` (default) raises ``ImageReadError``;
  ``on_error="skip"`` returns the next readable item instead (its own id) and records the bad
  id in ``ds.bad_ids`` (id -> reason, per process), so a training run survives it;
* with ``cache=``, files the cache builder could not read are dropped at construction and
  listed in ``ds.skipped``, so labels and ids stay aligned with what can be read;
* malformed metadata (CSV without a required column, a path escaping ``root``) raises
  :class:`~spcl_fast.data.errors.DataFormatError` naming the file, the row and the problem.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import operator
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataFormatError, ImageReadError
from .images import load_square

SPLIT_NAMES = ("train", "val", "test", "all")


@dataclasses.dataclass
class Index:
    """All rows of a release as a subclass parsed them (n rows, C classes)."""

    ids: list[str]  # unique image ids
    paths: list[str]  # absolute file paths, already checked to lie under root
    labels: np.ndarray  # float32 (n, C); NaN = unknown
    split: np.ndarray  # split name of each row
    patient_ids: list[str] | None = None  # None where the release has no patient key
    extra: dict[str, list] = dataclasses.field(default_factory=dict)  # more per-row attributes


def read_text(path: str) -> str:
    """A metadata file's text: UTF-8, a byte-order mark allowed. Raises
    :class:`DataFormatError` naming the file when it is absent or not UTF-8."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: file not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {exc.start} is "
                              f"{data[exc.start:exc.start + 1]!r})") from exc


def read_csv(path: str, required: Sequence[str], optional: Sequence[str] = ()
             ) -> dict[str, list[str]]:
    """Columns ``required`` (and ``optional``, "" where absent) of a CSV as lists of stripped
    strings.

    Header names are stripped (SIIM writes ``" EncodedPixels"``); extra columns, including empty
    trailing ones and headers that a comma inside brackets splits in two (NIH), are ignored;
    CRLF line ends, quoting and a byte-order mark are read as any CSV reader reads them.
    Raises :class:`DataFormatError` naming the file and the column or line at fault (also for
    text that is not UTF-8 and rows that the csv module cannot parse).
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        where = {}
        for name in required:
            if name not in header:
                raise DataFormatError(
                    f"{path}: missing column {name!r} (found {[h for h in header if h]})")
            where[name] = header.index(name)
        where.update({name: header.index(name) for name in optional if name in header})
        need = max(where.values()) + 1
        out = {name: [] for name in where}
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < need:
                raise DataFormatError(f"{path}: line {reader.line_num} has {len(row)} cells, "
                                      f"expected at least {need}")
            for name, k in where.items():
                out[name].append(row[k].strip())
    except csv.Error as exc:  # a NUL byte, an unterminated quote, a field over csv's limit
        raise DataFormatError(f"{path}: line {reader.line_num}: {exc}") from exc
    n = len(out[required[0]]) if required else 0
    out.update({name: [""] * n for name in optional if name not in out})
    return out


def safe_join(root: str, rel: str, source: str) -> str:
    """``root/rel`` for a relative path from metadata file ``source``; refuses absolute paths
    and ``..`` components (a listing must never reach outside the dataset folder)."""
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith(("/", "\\")) or os.path.isabs(rel) or ".." in parts:
        raise DataFormatError(f"{source}: path {rel!r} escapes the dataset root {root}")
    return os.path.join(root, *[p for p in parts if p not in ("", ".")])


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class CXRDataset(Dataset):
    """Base of the real datasets; see the module docstring for the bad-input policy.

    Items: ``{"image": float32 (1, S, S) in [0, 1], "labels": float32 (C,), "id": str}``, plus
    ``"mask": float32 (1, S, S)`` of 0/1 when the class has masks.
    Attributes: ``ids`` (n str), ``labels`` (float32 tensor (n, C), NaN = unknown, known
    without decoding), ``class_names`` (C str), ``patient_ids`` (n str, or None),
    ``paths`` (n absolute paths), ``skipped`` and ``bad_ids`` (id -> reason).
    """

    class_names: tuple = ()
    has_mask = False
    name = ""

    def __init__(self, root, split="train", image_size=224, cache=None, on_error="raise",
                 missing="skip"):
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        if not _is_int(image_size) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if missing not in ("skip", "raise", "keep"):
            raise ValueError(f"missing must be 'skip', 'raise' or 'keep', got {missing!r}")
        if root is None or not os.path.isdir(root):
            raise DataFormatError(f"{root}: dataset root is not a folder")
        self.root, self.split, self.image_size = os.fspath(root), split, image_size
        self.on_error, self.missing = on_error, missing
        self.skipped: dict[str, str] = {}
        self.bad_ids: dict[str, str] = {}
        index = self._read_index()
        keep = np.ones(len(index.ids), bool) if split == "all" else index.split == split
        self.cache = None
        if cache is not None:
            from .cache import CacheReader

            self.cache = cache if isinstance(cache, CacheReader) else CacheReader(cache)
            self.cache.check(self.name, image_size, self.has_mask)
            positions = self.cache.positions([index.ids[j] for j in np.flatnonzero(keep)])
            ok = self.cache.ok
            pos = np.full(len(index.ids), -1, np.int64)
            pos[keep] = positions
            for j in np.flatnonzero(keep):
                if not ok[pos[j]]:
                    keep[j] = False
                    self.skipped[index.ids[j]] = self.cache.error(pos[j])
            if self.skipped:
                warnings.warn(f"{type(self).__name__}({self.root!r}, {split!r}): "
                              f"{len(self.skipped)} files the cache could not read were skipped "
                              f"(see .skipped)", stacklevel=2)
        elif missing != "keep":
            for j in np.flatnonzero(keep):
                if not os.path.isfile(index.paths[j]):
                    reason = f"{index.paths[j]}: file not found"
                    if missing == "raise":
                        raise ImageReadError(reason)
                    keep[j] = False
                    self.skipped[index.ids[j]] = reason
            if self.skipped:
                warnings.warn(f"{type(self).__name__}({self.root!r}, {split!r}): "
                              f"{len(self.skipped)} listed files are absent and were skipped "
                              f"(see .skipped)", stacklevel=2)
        rows = np.flatnonzero(keep)
        self.ids = [index.ids[j] for j in rows]
        self.paths = [index.paths[j] for j in rows]
        self.labels = torch.from_numpy(np.ascontiguousarray(index.labels[rows], np.float32))
        self.labels = self.labels.reshape(len(rows), len(self.class_names))
        self.patient_ids = (None if index.patient_ids is None
                            else [index.patient_ids[j] for j in rows])
        self._cache_pos = pos[rows] if self.cache is not None else None
        for attr, values in index.extra.items():
            setattr(self, attr, [values[j] for j in rows])

    def _read_index(self) -> Index:
        raise NotImplementedError

    def _mask(self, j: int, hw: tuple[int, int]) -> np.ndarray:
        """Full-resolution binary mask ``(H, W)`` of item ``j`` (mask datasets only)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def decode(self, j: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
        """Raw path for item ``j``: the ``(S, S)`` float32 image, its ``(S, S)`` mask or None,
        and the source ``(H, W)``. Raises :class:`ImageReadError` for a bad file."""
        from .images import fit_square_mask

        img, hw = load_square(self.paths[j], self.image_size)
        mask = fit_square_mask(self._mask(j, hw), self.image_size) if self.has_mask else None
        return img, mask, hw

    def _load(self, j: int) -> dict:
        if self.cache is not None:
            image = self.cache.image(self._cache_pos[j])
            mask = self.cache.mask(self._cache_pos[j]) if self.has_mask else None
        else:
            img, mask, _ = self.decode(j)
            image = torch.from_numpy(img)[None]
            mask = None if mask is None else torch.from_numpy(mask)[None]
        item = {"image": image, "labels": self.labels[j].clone(), "id": self.ids[j]}
        if mask is not None:
            item["mask"] = mask
        return item

    def __getitem__(self, index) -> dict:
        j = operator.index(index)
        if not -len(self) <= j < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        j %= len(self)
        for k in range(len(self)):
            jj = (j + k) % len(self)
            try:
                return self._load(jj)
            except ImageReadError as exc:
                if self.on_error == "raise":
                    raise
                if self.ids[jj] not in self.bad_ids:  # once per file and process
                    warnings.warn(f"{exc}; skipped (the next readable item stands in)",
                                  stacklevel=2)
                self.bad_ids[self.ids[jj]] = str(exc)
        raise ImageReadError(f"{self.root}: no readable item in {type(self).__name__}")

    def images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Items ``start:stop`` as one float32 ``(n, 1, S, S)`` tensor (same policy as
        ``ds[i]``); with a cache this is a memory copy, without one every file is decoded."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) out of bounds for {len(self)} items")
        out = torch.empty(stop - start, 1, self.image_size, self.image_size)
        for n, j in enumerate(range(start, stop)):
            out[n] = self[j]["image"]
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, "
                f"n={len(self)}, image_size={self.image_size}, "
                f"cache={None if self.cache is None else self.cache.path!r})")
