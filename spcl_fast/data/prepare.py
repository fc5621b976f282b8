"""Build the preprocessing cache of a dataset: ``python -m spcl_fast.data.prepare``.

::

    python -m spcl_fast.data.prepare --dataset chestxray14 --root /data/nih --out /data/nih-256 \\
        --size 256 [--workers 8] [--dtype uint8] [--shard-size 256] [--max-shards N]

Every image of the dataset (``split="all"``; CheXpert with ``--all-views`` also keeps laterals)
is decoded once, fitted to ``size x size`` (:mod:`spcl_fast.data.images`), quantised and written
into shards (:mod:`spcl_fast.data.cache`) by a pool of worker processes, one shard per task,
with a progress bar. Each shard is written atomically and then marked done, so an interrupted
run (Ctrl-C, a crash, ``--max-shards``) resumes where it stopped when run again with the same
arguments, and the result is byte-identical to an uninterrupted run. Files that cannot be read
(absent, truncated, corrupt, no pixel data, absurd dimensions) never stop the run: they are
marked unreadable in the cache, listed in ``<out>/report.json`` and summarised at the end;
datasets given the cache drop them. Nothing from DICOM headers is written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys

import numpy as np

from ..cli import THREADS_HELP, ArgumentParser, positive_int, set_threads
from .cache import FORMAT, quantize, save_npy, shard_name, write_json
from .errors import ImageReadError

_DATASET = None  # the dataset of a worker process (set once by the pool initializer)


def _init_worker(dataset) -> None:
    global _DATASET
    _DATASET = dataset


def _init_pool_worker(dataset) -> None:
    # Ctrl-C is the parent's to handle (it stops the pool): no traceback from every worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(dataset)


def _write_shard(args) -> tuple[int, int]:
    """Decode items ``[start, stop)`` into shard ``shard`` of ``out``; returns (shard, count)."""
    shard, start, stop, out, dtype = args
    ds, size = _DATASET, _DATASET.image_size
    images = np.zeros((stop - start, size, size), quantize(np.zeros(1, np.float32), dtype).dtype)
    masks = np.zeros((stop - start, size, size), np.uint8) if ds.has_mask else None
    ok, hw, errors = [], [], {}
    for r, j in enumerate(range(start, stop)):
        try:
            img, mask, src_hw = ds.decode(j)
        except ImageReadError as exc:
            ok.append(False)
            hw.append([0, 0])
            errors[str(r)] = str(exc)
            continue
        images[r] = quantize(img, dtype)
        if masks is not None:
            masks[r] = mask
        ok.append(True)
        hw.append(list(src_hw))
    save_npy(os.path.join(out, shard_name("shard", shard)), images)
    if masks is not None:
        save_npy(os.path.join(out, shard_name("mask", shard)), masks)
    # Written last: its presence is what marks the shard as complete.
    write_json(os.path.join(out, shard_name("shard", shard, "json")),
               {"ok": ok, "hw": hw, "errors": errors})
    return shard, stop - start


def _ids_digest(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def prepare(dataset: str, root: str, out: str, size: int = 256, workers: int | None = None,
            dtype: str = "uint8", shard_size: int = 256, max_shards: int | None = None,
            progress: bool = True, **dataset_kwargs) -> dict:
    """Build (or resume) the cache of ``dataset`` at ``root`` into ``out``.

    Args:
        dataset: a name of :data:`spcl_fast.data.DATASETS` other than ``synthetic``.
        size: side of the cached square images (datasets must ask for this size).
        workers: decoding processes (default: all cores); 0 decodes in this process.
        dtype: ``"uint8"`` (default; what a display shows) or ``"uint16"``.
        shard_size: images per shard file (and per worker task).
        max_shards: stop after writing this many new shards (the rest on the next run).
        dataset_kwargs: passed to the dataset (e.g. ``frontal_only=False`` for CheXpert).

    Returns the report: ``{"dataset", "num_items", "num_done", "num_failed", "complete",
    "failures": [{"id", "error"}]}`` (also written to ``<out>/report.json``).
    """
    from . import build_dataset
    from .cache import DTYPES

    if dataset == "synthetic":
        raise ValueError("the synthetic set is rendered on the fly and needs no cache")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"max_shards must be >= 1, got {max_shards}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0: decode in this process), got {workers}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is a file, not a cache folder")
    ds = build_dataset(dataset, root, "all", size, missing="keep", **dataset_kwargs)
    n = len(ds)
    os.makedirs(out, exist_ok=True)
    meta = {
        "format": FORMAT, "dataset": ds.name, "image_size": size, "dtype": dtype,
        "shard_size": shard_size, "num_items": n, "has_mask": ds.has_mask,
        "class_names": list(ds.class_names), "ids_sha256": _ids_digest(ds.ids),
    }
    index_path = os.path.join(out, "index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            old = json.load(f)
        differ = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in meta.items() if old.get(k) != v]
        if differ:
            what = ["the file list" if d.startswith("ids_sha256") else d for d in differ]
            raise ValueError(f"{out} holds a cache built with other settings: {'; '.join(what)}"
                             "; use a new --out (or delete it) to start over")
    else:
        write_json(index_path, {**meta, "ids": ds.ids, "complete": False})
    np.save(os.path.join(out, "labels.npy"), ds.labels.numpy())

    for f in os.listdir(out):  # leftovers of a run killed mid-write
        if ".tmp" in f:
            os.remove(os.path.join(out, f))

    shards = [(s, s * shard_size, min(n, (s + 1) * shard_size))
              for s in range(-(-n // shard_size))]
    pending = [t for t in shards if not _done(out, t[0])]
    done_items = n - sum(stop - start for _, start, stop in pending)
    tasks = [(s, start, stop, out, dtype) for s, start, stop in pending[:max_shards]]
    workers = (os.cpu_count() or 1) if workers is None else workers
    from tqdm import tqdm

    with tqdm(total=n, initial=done_items, unit="img", desc=f"prepare {ds.name}",
              disable=not progress, file=sys.stderr) as bar:
        if workers == 0 or len(tasks) <= 1:
            _init_worker(ds)
            for t in tasks:
                bar.update(_write_shard(t)[1])
        else:
            # fork: workers inherit the dataset instead of unpickling it and importing torch.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(
                    min(workers, len(tasks)), _init_pool_worker, (ds,)) as pool:
                for _, count in pool.imap_unordered(_write_shard, tasks):
                    bar.update(count)
    return _finish(out, ds, shards, meta)


def _done(out: str, shard: int) -> bool:
    return os.path.isfile(os.path.join(out, shard_name("shard", shard, "json")))


def _finish(out: str, ds, shards, meta) -> dict:
    """Gather the shard records into ok/hw/report, and mark the cache complete if it is."""
    n = len(ds)
    ok, hw, failures, num_done = np.zeros(n, bool), np.zeros((n, 2), np.int32), [], 0
    for s, start, stop in shards:
        if not _done(out, s):
            continue
        with open(os.path.join(out, shard_name("shard", s, "json"))) as f:
            rec = json.load(f)
        ok[start:stop], hw[start:stop] = rec["ok"], rec["hw"]
        failures += [{"id": ds.ids[start + int(r)], "error": e} for r, e in rec["errors"].items()]
        num_done += stop - start
    complete = num_done == n
    report = {"dataset": ds.name, "num_items": n, "num_done": num_done,
              "num_failed": len(failures), "complete": complete,
              "failures": sorted(failures, key=lambda r: r["id"])}
    write_json(os.path.join(out, "report.json"), report)
    np.save(os.path.join(out, "ok.npy"), ok)
    np.save(os.path.join(out, "hw.npy"), hw)
    write_json(os.path.join(out, "index.json"), {**meta, "ids": ds.ids, "complete": complete})
    return report


def main(argv=None) -> int:
    from . import DATASETS

    p = ArgumentParser(prog="python -m spcl_fast.data.prepare",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=[d for d in DATASETS if d != "synthetic"])
    p.add_argument("--root", required=True, help="dataset folder in its official layout")
    p.add_argument("--out", required=True, help="cache folder (created; resumed if present)")
    p.add_argument("--size", type=int, default=256, help="side of the cached square images")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (all cores)")
    p.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"])
    p.add_argument("--shard-size", type=int, default=256, help="images per shard")
    p.add_argument("--max-shards", type=int, default=None,
                   help="write at most this many new shards, then stop (resume later)")
    p.add_argument("--all-views", action="store_true", help="CheXpert: keep lateral views too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    a = p.parse_args(argv)
    set_threads(a.threads)
    kwargs = {"frontal_only": False} if a.all_views and a.dataset == "chexpert" else {}
    try:
        report = prepare(a.dataset, a.root, a.out, a.size, a.workers, a.dtype, a.shard_size,
                         a.max_shards, progress=not a.quiet, **kwargs)
    except ValueError as exc:  # bad flags, a malformed dataset, a cache of other settings
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        # finished shards are marked done; the ones being written are redone on the next run
        print(f"interrupted: run the same command again to resume {a.out}", file=sys.stderr)
        return 130
    state = "complete" if report["complete"] else "incomplete (run again to resume)"
    print(f"{a.out}: {report['num_done']}/{report['num_items']} images, "
          f"{report['num_failed']} unreadable (listed in report.json); cache {state}")
    for r in report["failures"][:10]:
        print(f"  {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
