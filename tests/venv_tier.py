"""Virtualenvs for the test tiers that need other packages than the suite's own environment: the
GPU image's Triton (``slow`` tier of tests/test_aot.py) and real timm beside torch 2.14.1
(tests/test_timm_tier.py).

A tier's venv is built once and kept under ``$SPCL_FAST_VENV_CACHE`` (default
``~/.cache/spcl_fast/venvs``), in a folder named after what it holds, so later runs and fresh
clones on the same machine reuse it; a build that did not finish is thrown away and redone. If
pip cannot build it (no index reachable, a package missing, too little disk), the tier skips and
says why. ``SPCL_FAST_<TIER>_PYTHON`` (e.g. ``SPCL_FAST_TIMM_PYTHON``,
``SPCL_FAST_TRITON_3_6_PYTHON``) names a ready interpreter instead.

``inherit=True`` makes the venv see the packages of the interpreter running the suite (through a
``.pth`` file that adds that interpreter's site folders after the venv's own), whether the suite
runs in a plain install or inside a virtualenv: ``--system-site-packages`` would expose the
*base* interpreter's packages, not the outer venv's. Packages installed in the tier's venv come
first on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READY = ".spcl-tier-ready.json"  # written last: a venv without it is an unfinished build


def cache_root() -> Path:
    """Where tier venvs are kept: ``$SPCL_FAST_VENV_CACHE``, else ``~/.cache/spcl_fast/venvs``
    (``$XDG_CACHE_HOME`` replaces ``~/.cache``)."""
    if os.environ.get("SPCL_FAST_VENV_CACHE"):
        return Path(os.environ["SPCL_FAST_VENV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spcl_fast" / "venvs"


def outer_site_dirs() -> list[str]:
    """The site folders of the interpreter running the suite (a venv's own, and its base's when
    that venv sees system packages), in import order."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


@contextlib.contextmanager
def tier_venv(tier: str, requirements: Sequence[str], *, inherit: bool = False,
              checkout: str | None = None, min_free_gb: float = 1.0,
              timeout: float = 1800) -> Iterator[str]:
    """The Python of tier ``tier``'s venv, with ``requirements`` pip-installed: built on first
    use, then reused. Held under a lock for the block (one build or checkout install at a time).

    Args:
        tier: short name, also of the ``SPCL_FAST_<TIER>_PYTHON`` override.
        requirements: pip requirement strings.
        inherit: see the module docstring.
        checkout: install this checkout into the venv with this extra (``pip install -e
            ".[<extra>]"``, its dependencies too) before the block, unless the venv already
            holds it as of the current pyproject.toml.
        min_free_gb: disk the build needs; skip ahead of it with less free.
        timeout: seconds the build may take.
    """
    ready = os.environ.get("SPCL_FAST_" + re.sub(r"\W", "_", tier.upper()) + "_PYTHON")
    if ready:
        yield ready
        return
    key = json.dumps({"python": sys.version, "requirements": list(requirements),
                      "inherit": outer_site_dirs() if inherit else None}, sort_keys=True)
    folder = cache_root() / f"{tier}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    python = folder / "bin" / "python"
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / READY).exists():
            _build(folder, requirements, inherit, min_free_gb, timeout)
            _remove_older(folder, tier)
        if checkout is not None:
            _install_checkout(folder, checkout)
        yield str(python)


def build_seconds(python: str) -> float | None:
    """How long the venv of ``python`` took to build (None for a venv not built here)."""
    marker = Path(python).parents[1] / READY
    return json.loads(marker.read_text())["build_s"] if marker.exists() else None


def _build(folder: Path, requirements: Sequence[str], inherit: bool, min_free_gb: float,
           timeout: float) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    free_gb = shutil.disk_usage(folder.parent).free / 2**30
    if free_gb < min_free_gb:
        pytest.skip(f"tier venv {folder.name} needs ~{min_free_gb:.0f} GB of disk, "
                    f"{free_gb:.1f} GB free under {folder.parent}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = str(folder / "bin" / "python")
    if inherit:
        purelib = subprocess.run([python, "-c", "import sysconfig; "
                                  "print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        dirs = outer_site_dirs()  # site folders, so that their own .pth files are read
        Path(purelib, "_spcl_outer_site.pth").write_text(
            f"import site; list(map(site.addsitedir, {dirs!r}))\n")
        subprocess.run([python, "-c", f"import sys; assert set({dirs!r}) <= set(sys.path)"],
                       check=True)
    try:
        proc = subprocess.run([python, "-m", "pip", "install", "--no-cache-dir", "-q",
                               *requirements], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"tier venv {folder.name}: pip install {' '.join(requirements)} took over "
                    f"{timeout:.0f} s")
    if proc.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"tier venv {folder.name}: pip cannot install {' '.join(requirements)}: "
                    f"{proc.stderr.strip()[-300:]}")
    (folder / READY).write_text(json.dumps({"build_s": round(time.perf_counter() - start, 1),
                                            "requirements": list(requirements)}))


def _remove_older(folder: Path, tier: str) -> None:
    """Delete this tier's other venvs (built for other requirements), unless one is in use."""
    for other in folder.parent.glob(f"{tier}-{'?' * 12}"):
        if other == folder or not other.is_dir():
            continue
        with open(other.with_name(other.name + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(other, ignore_errors=True)


def _install_checkout(folder: Path, extra: str) -> None:
    """``pip install -e ".[extra]"`` of this checkout into the venv at ``folder``, unless the
    venv holds this checkout as of its current pyproject.toml (dependencies may change)."""
    marker = folder / ".spcl-checkout.json"
    want = {"root": str(ROOT), "extra": extra,
            "pyproject": hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return
    marker.unlink(missing_ok=True)
    proc = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install",
                           "--no-cache-dir", "-q", "--no-build-isolation",
                           "-e", f"{ROOT}[{extra}]"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"installing {ROOT} into {folder}: {proc.stderr[-2000:]}"
    marker.write_text(json.dumps(want))
