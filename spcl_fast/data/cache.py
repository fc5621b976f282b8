"""The preprocessing cache: every image of a dataset decoded once, fitted to ``S x S`` (the
aspect policy of :mod:`spcl_fast.data.images`) and stored as uint8 (or uint16) memory-mapped
shards, so a training read is a page-cache copy and one division.

Layout of a cache folder (written by :mod:`spcl_fast.data.prepare`)::

    index.json          format, dataset, image_size, dtype, shard_size, num_items, has_mask,
                        class_names, ids (the dataset's own image ids), complete
    labels.npy          float32 (n, C), NaN = unknown
    ok.npy, hw.npy      bool (n,) decoded or not; int32 (n, 2) source (H, W), 0 if not read
    report.json         the files that could not be read: [{"id", "error"}, ...]
    shard-00000.npy     uint8/uint16 (k, S, S) images of items [0, k), k = shard_size
    mask-00000.npy      uint8 (k, S, S) 0/1 masks (mask datasets only)
    shard-00000.json    per-shard ok/hw/errors; written last, so its presence marks a shard
                        as complete (what makes ``prepare`` resumable)

Nothing from a DICOM header is stored: ids come from the dataset's CSV, errors name files and
problems only. Datasets read from a cache when given ``cache=<folder>`` (or a
:class:`CacheReader`); item ``j`` of a dataset maps to the cache row of its id.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from .errors import DataFormatError

FORMAT = 1
DTYPES = {"uint8": (np.uint8, 255.0), "uint16": (np.uint16, 65535.0)}


def shard_name(kind: str, shard: int, ext: str = "npy") -> str:
    return f"{kind}-{shard:05d}.{ext}"


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def save_npy(path: str, arr: np.ndarray) -> None:
    """``np.save`` through a temporary file and an atomic rename (no half-written shards)."""
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def quantize(img: np.ndarray, dtype: str) -> np.ndarray:
    """float32 in [0, 1] to the cache dtype (round to nearest)."""
    np_dtype, scale = DTYPES[dtype]
    return np.rint(np.clip(img, 0.0, 1.0) * np.float32(scale)).astype(np_dtype)


class CacheReader:
    """Read-only view of a complete cache folder.

    ``image(pos)`` returns float32 ``(1, S, S)`` in [0, 1] (one division of the stored integers);
    ``mask(pos)`` float32 ``(1, S, S)`` of 0/1. Shards are memory-mapped lazily in each process
    (pickling drops the maps, so DataLoader workers map their own).

    Example::

        >>> import tempfile
        >>> from devtools.fixtures import make_chestxray14
        >>> from spcl_fast.data.prepare import prepare
        >>> root, out = make_chestxray14(tempfile.mkdtemp(), n=6), tempfile.mkdtemp()
        >>> _ = prepare("chestxray14", root, out, size=64, workers=0, progress=False)
        >>> reader = CacheReader(out)
        >>> reader.image(reader.positions(["00000001_000.png"])[0]).shape
        torch.Size([1, 64, 64])
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, "index.json")
        if not os.path.isfile(index_path):
            raise DataFormatError(f"{self.path}: not a cache folder (no index.json)")
        with open(index_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise DataFormatError(f"{index_path}: cache format {meta.get('format')}, "
                                  f"this library reads {FORMAT}")
        if not meta.get("complete"):
            raise DataFormatError(f"{self.path}: cache is incomplete; run "
                                  "`python -m spcl_fast.data.prepare` again to finish it")
        self.meta = meta
        self.dataset, self.image_size = meta["dataset"], int(meta["image_size"])
        self.shard_size, self.has_mask = int(meta["shard_size"]), bool(meta["has_mask"])
        self.dtype, self.class_names = meta["dtype"], tuple(meta["class_names"])
        self.ids = list(meta["ids"])
        self._scale = np.float32(DTYPES[self.dtype][1])
        self.ok = np.load(os.path.join(self.path, "ok.npy"))
        self.hw = np.load(os.path.join(self.path, "hw.npy"))
        self.labels = np.load(os.path.join(self.path, "labels.npy"))
        self._pos = {i: p for p, i in enumerate(self.ids)}
        self._errors = None
        self._maps: dict = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def check(self, dataset: str, image_size: int, has_mask: bool) -> None:
        """Raise :class:`DataFormatError` unless this cache fits the dataset asking for it."""
        if dataset != self.dataset:
            raise DataFormatError(f"{self.path}: cache of {self.dataset!r}, not {dataset!r}")
        if image_size != self.image_size:
            raise DataFormatError(f"{self.path}: cache built at image_size={self.image_size}, "
                                  f"dataset asks for {image_size}: prepare one with --size "
                                  f"{image_size}, or train at --image-size {self.image_size}")
        if has_mask and not self.has_mask:
            raise DataFormatError(f"{self.path}: cache holds no masks")

    def positions(self, ids) -> np.ndarray:
        """Cache rows of ``ids``; raises if any is absent (a cache of another root/options)."""
        absent = [i for i in ids if i not in self._pos]
        if absent:
            raise DataFormatError(
                f"{self.path}: {len(absent)} ids of the dataset are not in the cache (built "
                f"from another root or with other options?), e.g. {absent[:3]}")
        return np.array([self._pos[i] for i in ids], np.int64)

    def error(self, pos: int) -> str:
        """Why the cache builder could not read row ``pos``."""
        if self._errors is None:
            with open(os.path.join(self.path, "report.json")) as f:
                self._errors = {r["id"]: r["error"] for r in json.load(f)["failures"]}
        return self._errors.get(self.ids[pos], "unreadable when the cache was built")

    def _array(self, kind: str, shard: int) -> np.ndarray:
        key = (kind, shard)
        arr = self._maps.get(key)
        if arr is None:
            path = os.path.join(self.path, shard_name(kind, shard))
            # A plain ndarray view of the map: indexing np.memmap itself costs microseconds.
            arr = np.load(path, mmap_mode="r").view(np.ndarray)
            self._maps[key] = arr
        return arr

    def image(self, pos: int) -> torch.Tensor:
        shard, row = divmod(int(pos), self.shard_size)
        src = self._array("shard", shard)[row]
        out = torch.empty(1, self.image_size, self.image_size)
        np.divide(src, self._scale, out=out.numpy()[0])
        return out

    def mask(self, pos: int) -> torch.Tensor:
        shard, row = divmod(int(pos), self.shard_size)
        src = self._array("mask", shard)[row]
        out = torch.empty(1, self.image_size, self.image_size)
        out.numpy()[0] = src
        return out
