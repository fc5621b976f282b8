"""Checkpoints that survive crashes: written to a temp file and renamed, the last K kept, and a
corrupt newest file falls back to the previous one."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def save_checkpoint(state: dict, out_dir: str | Path, step: int, keep_last: int = 2) -> Path:
    """Atomically write ``state`` as ``ckpt-<step>.pt`` and delete all but the newest
    ``keep_last`` checkpoints (and temp files that killed writers left behind). One writer per
    run folder."""
    path = save_atomic(state, checkpoint_path(out_dir, step))
    for old in list_checkpoints(out_dir)[:-keep_last]:
        if old != path:  # never the file just written, whatever else the folder holds
            old.unlink(missing_ok=True)
    for stale in path.parent.glob("ckpt-*.pt.tmp"):
        stale.unlink(missing_ok=True)
    return path


def save_atomic(state: dict, path: str | Path) -> Path:
    """``torch.save(state, path)`` through ``<path>.tmp`` and a rename, both made durable, so
    a reader (or a run killed mid-write) sees the old file or the new one, never a torn one; a
    write that fails (``OSError``) removes its temp file and raises."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # a full disk, say: leave no torn temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # ... and the rename itself, before older files go
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a run killed mid-write) sees the old
    file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: str | Path) -> int:
    """The step in a ``ckpt-<step>.pt`` name."""
    m = PATTERN.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named ckpt-<step>.pt")
    return int(m.group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


class CheckpointError(ValueError):
    """Nothing readable where a checkpoint should be (every candidate file is torn or not a
    checkpoint)."""


def load_error(exc: Exception) -> str:
    """What ``torch.load`` objected to, in one line: its messages can be empty (an empty file),
    a bare byte value, or paragraphs of advice before the actual ``WeightsUnpickler`` error."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"{type(exc).__name__}: the file is empty or cut off" if isinstance(
            exc, EOFError) else type(exc).__name__
    first = lines[0].split(". ", 1)[0].rstrip(".")  # its first sentence, whole
    if len(first) > 200:
        first = first[:200].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {first}"


def _reason(path: Path, exc: Exception) -> str:
    try:  # the size tells a torn write (a few bytes) from a foreign file at a glance
        size = f"{path.stat().st_size} bytes, "
    except OSError:
        size = ""
    return f"not a readable torch checkpoint ({size}{load_error(exc)})"


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict, Path]:
    """Load a checkpoint file, or the newest readable one of a run folder.

    Returns ``(state, path)``. Raises ``FileNotFoundError`` when there is nothing to load and
    :class:`CheckpointError` when nothing there can be read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    candidates = list(reversed(list_checkpoints(path))) if path.is_dir() else [path]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in {path}")
    errors = []
    for i, candidate in enumerate(candidates):
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=True)
        except Exception as exc:  # a torn or corrupt file: fall back to the previous one
            reason = _reason(candidate, exc)
            errors.append(f"{candidate.name}: {reason}")
            if i + 1 < len(candidates):
                warnings.warn(f"could not read checkpoint {candidate} ({reason}); trying "
                              f"{candidates[i + 1].name}", stacklevel=2)
            continue
        return state, candidate
    raise CheckpointError(f"no readable checkpoint in {path}: " + "; ".join(errors))
