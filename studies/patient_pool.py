"""Does more unlabelled data help? The default recipe pre-trained on a pool of the NIH training
films and the pediatric training films, scored on the NIH screen (issue 37: self-supervision
is for the films nobody labelled)::

    python -m studies.patient_pool --out runs/patient-pool [--steps 180,720] [--seed 0] \\
        [--screen runs/ps-nih-s0] [--kermany runs/ps-kermany-s0] \\
        [--runs nih_720=runs/ps-nih-long/k05_intra_similar_g1] [--stages primary,fraction] \\
        [--results studies/results/patient-screen-nih-demo-pool.json]

The pool (``<out>/pool``, a ``folder`` dataset of one folder per patient) holds the films of
``nih-demo``'s ``train`` split, the films the NIH screen pre-trains on, and the pediatric
set's training patients (:mod:`studies.patient_screen` writes them under ``--kermany``): about
five times the NIH films, of children from another hospital. No NIH test patient is in it.
The default recipe trains on it for each of ``--steps`` (180: the screen's budget, so the
same seconds as the default on NIH alone). The runs are then added as rows to the seed-``N``
NIH screen (``--screen``, its default row and baselines read back), with ``--runs`` (e.g.
the default trained for 720 steps on NIH alone, the same steps on less data), and the
results written as a screen's: ``python -m studies.patient_tables`` makes their tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np

from . import patient_screen
from .run import _train, run_config

RECIPE = "k05_intra_similar_g1"


def write_pool(out: Path, kermany_out: Path,
               kermany_root: Path = patient_screen.KERMANY_ROOT) -> Path:
    """``out/pool``: the NIH ``train`` films and the pediatric training patients' films, one
    folder per patient (``nih_<id>``, ``kermany_<id>``); written once."""
    from PIL import Image

    from spcl_fast.data import NIHDemo

    pool, done = out / "pool", out / "pool" / "done"
    if done.exists():
        return pool
    if pool.exists():
        shutil.rmtree(pool)  # a pool left half-written: write it again
    films = NIHDemo("train")
    pixels = np.round(films.images()[:, 0].numpy() * 255).astype(np.uint8)
    for i, (image, patient) in enumerate(zip(pixels, films.patient_ids, strict=True)):
        folder = pool / f"nih_{patient}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    kermany = patient_screen.instrument_data("kermany", kermany_out,
                                             kermany_root)["set"]["data_root"]
    for patient in sorted(Path(kermany).iterdir()):
        if patient.is_dir():
            target = pool / f"kermany_{patient.name}"
            target.mkdir(parents=True, exist_ok=True)
            for png in patient.glob("*.png"):
                try:
                    os.link(png, target / png.name)  # the same bytes, no copy
                except OSError:  # another file system (or no hard links): copy
                    shutil.copyfile(png, target / png.name)
    done.touch()
    return pool


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.patient_pool",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/patient-pool")
    p.add_argument("--steps", default="180,720")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screen", default="runs/ps-nih-s0",
                   help="the NIH screen's --out of this seed (its default row is read back)")
    p.add_argument("--kermany", default="runs/ps-kermany-s0",
                   help="the pediatric screen's --out (its training films join the pool)")
    p.add_argument("--runs", default="", help="more finished runs to add as rows, name=dir,...")
    p.add_argument("--stages", default="primary,fraction",
                   help="the screen's stages to score the rows by")
    p.add_argument("--results", default="studies/results/patient-screen-nih-demo-pool.json")
    args = p.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s]
    except ValueError:
        raise SystemExit(f"error: --steps takes step counts, got {args.steps!r}") from None
    if not steps or min(steps) < 1:
        raise SystemExit(f"error: --steps takes step counts >= 1, got {args.steps!r}")
    out = Path(args.out)
    pool = write_pool(out, Path(args.kermany))
    over = {"dataset": "folder", "data_root": str(pool), **patient_screen.THREADS}
    runs = []
    for count in steps:
        folder = out / f"pool-{count}"
        if not (folder / "summary.json").exists():
            _train(run_config(over, RECIPE, args.seed, count).replace(probe=False), folder)
        runs.append(f"pool_{count}={folder}")
    runs += [r for r in args.runs.split(",") if r]
    return patient_screen.main(["--out", args.screen, "--set", "nih-demo",
                                "--seed", str(args.seed), "--recipes", RECIPE,
                                "--runs", ",".join(runs), "--stages", args.stages,
                                "--results", args.results])


if __name__ == "__main__":
    main()
