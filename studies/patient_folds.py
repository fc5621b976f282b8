"""Confirm the screen's leading recipes on patient-grouped folds (issue 37 §2), on nih-demo.

::

    python -m studies.patient_folds --out runs/patient-folds \\
        [--recipes k05_intra_similar_g1:180,simclr:92,...] [--folds 5]
        [--results studies/results/patient-folds-nih-demo.json]

The screen (:mod:`studies.patient_screen`) scores every row on one fixed cut: 247 test
patients. Here every one of the 823 patients of the embedded NIH films is a test patient once:
five label-stratified, patient-grouped folds (:func:`spcl_fast.eval.patient.patient_folds`).
For each fold, each recipe pre-trains from scratch on that fold's training patients only (its
step count given after the colon: the screen's equal-seconds budget), then a linear probe on
mean-pooled tokens, its L2 strength chosen by grouped cross-validation inside the training
patients, scores the fold's test films. Raw pixels and the ViT at initialisation are probed the
same way. The out-of-fold scores of all 1,785 films are pooled into one AUROC per row, with a
cluster bootstrap over all 823 patients (the same resamples for every row, so differences are
paired); the per-fold AUROCs are kept beside it.

Scores are kept per fold and row under ``--out`` (a rerun skips what is done); the results file
is rewritten after every fold and row. ``python -m studies.patient_folds --tables`` rewrites the
tables in docs/patient-eval.md from the results file; ``--check`` says whether they match.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spcl_fast.data import NIHDemo, TensorImages
from spcl_fast.eval.metrics import auroc
from spcl_fast.eval.patient import (
    fmt_interval,
    patient_folds,
    pixel_features,
    probe_scores,
    readout_features,
    resampled_aurocs,
    summarise,
)
from spcl_fast.run.data import intensity_stats, normalizer
from spcl_fast.run.model import build_model
from spcl_fast.train.trainer import Trainer

from .run import RECIPES, run_config

SET = {"dataset": "nih-demo", "num_workers": "0", "threads": "1"}
DEFAULT_RECIPES = ("k05_intra_similar_g1:180,simclr:92,k05_intra:219,mae:278,dino:33,"
                   "spcl_k1_learned_lr:104")
RESULTS = Path("studies/results/patient-folds-nih-demo.json")
DOCS = (Path("docs/patient-eval.md"),)
RESAMPLES = 2000
LABELS = {"raw_pixels": "raw pixels", "init": "init (same ViT, random weights)"}


def fold_data(n_folds: int, seed: int = 0) -> dict:
    """Every film, its normal-vs-abnormal label, patient and NIH sample, and the folds."""
    films = NIHDemo("all")
    labels = films.labels[:, 0].numpy().astype(np.float64)
    groups = np.asarray([str(p) for p in films.patient_ids], dtype=object)
    return {"images": films.images(), "labels": labels, "groups": groups,
            "sources": np.asarray(films.source, dtype=object),
            "folds": patient_folds(groups, labels, n_folds, seed)}


def pretrain(recipe: str, steps: int, train_set: TensorImages, seed: int):
    """The recipe pre-trained on ``train_set`` for ``steps`` steps; returns ``(encoder,
    transform, seconds)``."""
    config = run_config(SET, recipe, seed, steps).replace(probe=False)
    config.check()
    trainer = Trainer(config, source=train_set)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = time.perf_counter() - started
    return (trainer.model.encoder.eval(), normalizer(config.data.normalize, trainer.stats),
            seconds)


def fold_scores(row: str, steps: int, data: dict, fold: int, out: Path, seed: int) -> dict:
    """The row's test scores on ``fold`` (kept as ``out/<row>/fold<k>.npz``)."""
    path = out / row / f"fold{fold}.npz"
    if path.exists():
        with np.load(path) as z:
            return {"scores": z["scores"], "seconds": float(z["seconds"])}
    train_idx, test_idx = data["folds"][fold]
    images, groups = data["images"], data["groups"]
    train_set = TensorImages(images[train_idx], patient_ids=list(groups[train_idx]))
    seconds = 0.0
    if row in ("raw_pixels", "init"):
        config = run_config(SET, "k05_intra_similar_g1", seed, 1)  # the encoder and its input
        transform = normalizer(config.data.normalize, intensity_stats("nih-demo", train_set))
        if row == "raw_pixels":
            feats = pixel_features(images, transform)
        else:
            feats = readout_features(build_model(config).encoder.eval(), images, transform)["mean"]
    else:
        encoder, transform, seconds = pretrain(row, steps, train_set, seed)
        feats = readout_features(encoder, images, transform)["mean"]
    scores, _ = probe_scores(feats[train_idx], data["labels"][train_idx], groups[train_idx],
                             feats[test_idx], seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, scores=scores, seconds=seconds)
    return {"scores": scores, "seconds": seconds}


def summary(done: dict[str, list[dict]], data: dict, steps: dict[str, int], reference: str,
            n_folds: int) -> dict:
    """Pooled out-of-fold AUROCs with patient-level intervals, paired differences against raw
    pixels, init and ``reference``, and the per-fold AUROCs, of the rows with every fold;
    ``by_source``: the same pooled scores read on each NIH sample's films and patients apart
    (the probes are those trained on both samples)."""
    complete = {row: folds for row, folds in done.items() if len(folds) == n_folds}
    pooled = {}
    for row, folds in complete.items():
        scores = np.empty(len(data["labels"]))
        for (_, test_idx), fold in zip(data["folds"], folds, strict=True):
            scores[test_idx] = fold["scores"]
        pooled[row] = scores
    pairs = [(a, b) for a in pooled for b in ("raw_pixels", "init", reference)
             if b in pooled and a != b and a not in ("raw_pixels", "init")]

    def scored(films):  # intervals and paired differences on these films' patients
        values, samples, patients = resampled_aurocs(
            {row: s[films] for row, s in pooled.items()}, data["labels"][films],
            data["groups"][films], RESAMPLES)
        return {"films": int(len(films)), "patients": patients,
                **summarise(values, samples, pairs)}

    everyone = scored(np.arange(len(data["labels"])))
    sources = data.get("sources")
    by_source = ({} if sources is None else
                 {str(src): scored(np.flatnonzero(sources == src))
                  for src in sorted(set(sources))})
    per_fold = {row: [auroc(torch.as_tensor(f["scores"]), torch.as_tensor(data["labels"][t]))
                      for f, (_, t) in zip(folds, data["folds"], strict=True)]
                for row, folds in complete.items()}
    return {
        "instrument": {"set": "nih-demo", "endpoint": "normal vs abnormal", "folds": n_folds,
                       "films": everyone["films"], "patients": everyone["patients"],
                       "probe": "linear on mean-pooled tokens (raw pixels: on the pixels), L2 "
                                "chosen by grouped CV inside each fold's training patients",
                       "pooling": "out-of-fold scores of every film, one AUROC; cluster "
                                  "bootstrap over all patients", "resamples": RESAMPLES},
        "reference": reference,
        "rows": {row: {"steps": steps.get(row, 0),
                       "train_seconds_per_fold": [round(f["seconds"], 1) for f in folds],
                       "fold_auroc": per_fold[row]} for row, folds in complete.items()},
        "auroc": everyone["auroc"], "difference": everyone["difference"],
        "by_source": by_source,
        "environment": {"torch": torch.__version__, "machine": platform.machine(),
                        "note": "2 CPU cores shared with other jobs; 1 thread per run"},
    }


def markdown(result: dict) -> str:
    """The folds table of docs/patient-eval.md."""
    ref = result["reference"]
    lines = ["| row | steps | training s per fold | pooled AUROC [95 % patient interval] | "
             f"minus raw pixels | minus init | minus {ref} | AUROC per fold |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    diff = result["difference"]
    for row, entry in result["auroc"].items():
        info = result["rows"][row]
        secs = info["train_seconds_per_fold"]
        mean_s = f"{np.mean(secs):.0f}" if any(secs) else "—"
        cells = [fmt_interval(diff[f"{row} - {b}"], signed=True) if f"{row} - {b}" in diff
                 else "—" for b in ("raw_pixels", "init", ref)]
        folds = " ".join(f"{v:.3f}" for v in info["fold_auroc"])
        lines.append(f"| {LABELS.get(row, row)} | {info['steps'] or '—'} | {mean_s} | "
                     f"{fmt_interval(entry)} | {' | '.join(cells)} | {folds} |")
    inst = result["instrument"]
    lines.append("")
    lines.append(f"{inst['films']} films of {inst['patients']} patients, each a test patient "
                 f"once in {inst['folds']} folds; {inst['resamples']} patient resamples.")
    return "\n".join(lines)


def markdown_by_source(result: dict) -> str:
    """The pooled AUROCs and differences on each NIH sample apart."""
    ref = result["reference"]
    lines = [f"| sample | row | pooled AUROC [95 % patient interval] | minus raw pixels | "
             f"minus init | minus {ref} |", "|---|---|---:|---:|---:|---:|"]
    notes = []
    for source, part in result["by_source"].items():
        diff = part["difference"]
        for row, entry in part["auroc"].items():
            cells = [fmt_interval(diff[f"{row} - {b}"], signed=True)
                     if f"{row} - {b}" in diff else "—" for b in ("raw_pixels", "init", ref)]
            lines.append(f"| {source} | {LABELS.get(row, row)} | {fmt_interval(entry)} | "
                         f"{' | '.join(cells)} |")
        notes.append(f"{source}: {part['films']} films of {part['patients']} patients")
    return "\n".join([*lines, "", "; ".join(notes) + "."])


BLOCKS = {"table": markdown, "by-source": markdown_by_source}


def doc_with_table(doc: str, result: dict) -> str:
    """``doc`` with every ``<!-- folds: NAME -->`` block it holds regenerated from ``result``
    (it must hold ``table``)."""
    if "<!-- folds: table -->" not in doc:
        raise SystemExit("error: a document of DOCS has no '<!-- folds: table -->' block")
    for name, render in BLOCKS.items():
        block = re.compile(rf"(<!-- folds: {name} -->\n)(.*?)(\n<!-- end folds -->)", re.S)
        doc = block.sub(lambda m, render=render: m.group(1) + render(result) + m.group(3), doc)
    return doc


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m studies.patient_folds",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/patient-folds")
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help="recipe:steps,... (the first is the reference)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--tables", action="store_true", help="rewrite the docs table and stop")
    p.add_argument("--check", action="store_true", help="exit 1 if the docs table is stale")
    args = p.parse_args(argv)
    if args.tables or args.check:
        result = json.loads(Path(args.results).read_text())
        for path in DOCS:
            doc = path.read_text()
            want = doc_with_table(doc, result)
            if args.check and want != doc:
                print(f"{path}'s folds table differs from {args.results}: run "
                      "python -m studies.patient_folds --tables", file=sys.stderr)
                raise SystemExit(1)
            if not args.check:
                path.write_text(want)
        return None
    steps = {}
    for item in args.recipes.split(","):
        name, _, count = item.partition(":")
        if name not in RECIPES or not count.isdigit():
            raise SystemExit(f"error: --recipes takes recipe:steps pairs of known recipes, "
                             f"got {item!r}")
        steps[name] = int(count)
    torch.set_num_threads(1)
    data = fold_data(args.folds, args.seed)
    out, reference = Path(args.out), next(iter(steps))
    done: dict[str, list[dict]] = {}
    for row in ("raw_pixels", "init", *steps):
        done[row] = []
        for fold in range(args.folds):
            started = time.perf_counter()
            done[row].append(fold_scores(row, steps.get(row, 0), data, fold, out, args.seed))
            print(f"{row} fold {fold}: {time.perf_counter() - started:.0f} s", flush=True)
        result = summary(done, data, steps, reference, args.folds)
        Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.results} ({row} done)", flush=True)
    return result


if __name__ == "__main__":
    main()
