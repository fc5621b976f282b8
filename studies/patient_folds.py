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
is rewritten after every fold and row. ``--fractions`` also probes each fold on 5 / 10 / 25 /
50 % of its training patients (3 draws; the features are kept, so adding them later costs no
pre-training). ``python -m studies.patient_folds --tables`` rewrites the tables in
docs/patient-eval.md and README.md from the results file; ``--check`` says whether they match.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from spcl_fast.data import NIHDemo, TensorImages
from spcl_fast.eval.metrics import auroc
from spcl_fast.eval.patient import (
    FRACTIONS,
    fmt_interval,
    label_fraction_draws,
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
DEFAULT_RECIPES = "k05_intra_similar_g1:180,simclr:92,k05_intra:219,mae:278,dino:33"
RESULTS = Path("studies/results/patient-folds-nih-demo.json")
DOCS = (Path("docs/patient-eval.md"), Path("README.md"))
RESAMPLES = 2000
DRAWS = 3  # label-fraction draws per fold
# the rows the saved results probe on label fractions (k05_intra, trained before features were
# kept, would need its five pre-trainings again)
FRACTION_ROWS = ("raw_pixels", "init", "k05_intra_similar_g1", "simclr", "mae", "dino")
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


def _features(row: str, steps: int, data: dict, fold: int, seed: int
              ) -> tuple[np.ndarray, float]:
    """Mean-token features of every film by the row's encoder of ``fold`` (raw pixels: the
    normalised pixels) and its pre-training seconds."""
    train_idx, _ = data["folds"][fold]
    images, groups = data["images"], data["groups"]
    train_set = TensorImages(images[train_idx], patient_ids=list(groups[train_idx]))
    if row in ("raw_pixels", "init"):
        config = run_config(SET, "k05_intra_similar_g1", seed, 1)  # the encoder and its input
        transform = normalizer(config.data.normalize, intensity_stats("nih-demo", train_set))
        if row == "raw_pixels":
            return pixel_features(images, transform), 0.0
        return readout_features(build_model(config).encoder.eval(), images,
                                transform)["mean"], 0.0
    encoder, transform, seconds = pretrain(row, steps, train_set, seed)
    return readout_features(encoder, images, transform)["mean"], seconds


def fold_scores(row: str, steps: int, data: dict, fold: int, out: Path, seed: int,
                fractions: bool = False) -> dict:
    """The row's test scores on ``fold``: ``scores`` (the probe on all training patients) and,
    with ``fractions``, ``fraction/<f>/<draw>`` (on :func:`label_fraction_draws` of them),
    and ``seconds``. Kept as ``out/<row>/fold<k>.npz`` with the features beside it
    (``fold<k>-features.npy``), so that adding fractions later needs no pre-training."""
    path = out / row / f"fold{fold}.npz"
    kept = dict(np.load(path)) if path.exists() else {}
    train_idx, test_idx = data["folds"][fold]
    groups, labels = data["groups"], data["labels"]
    tasks = {"scores": train_idx}
    if fractions:
        for (fraction, draw), sub in label_fraction_draws(groups[train_idx], FRACTIONS, DRAWS,
                                                          seed).items():
            if fraction < 1:
                tasks[f"fraction/{fraction}/{draw}"] = train_idx[sub]
    missing = [k for k in tasks if k not in kept]
    if missing:
        cached = out / row / f"fold{fold}-features.npy"
        if cached.exists():
            feats = np.load(cached)
        else:
            feats, seconds = _features(row, steps, data, fold, seed)
            if "seconds" in kept and seconds:
                seconds = float(kept["seconds"])  # the first training's seconds stay
            kept["seconds"] = np.asarray(seconds)
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, feats)
        for key in missing:
            idx = tasks[key]
            kept[key], _ = probe_scores(feats[idx], labels[idx], groups[idx], feats[test_idx],
                                        seed=seed)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as f:
            np.savez(f, **kept)
        partial.replace(path)
    return {"scores": kept["scores"], "seconds": float(kept["seconds"]),
            "fractions": {k: v for k, v in kept.items() if k.startswith("fraction/")}}


def fraction_rows(spec: str | None, rows: Sequence[str]) -> set[str]:
    """The rows of ``rows`` that ``--fractions`` names: ``all``, ``none``, names (each must be
    a row that runs), or ``None``: :data:`FRACTION_ROWS` among ``rows``."""
    if spec is None:
        return set(FRACTION_ROWS) & set(rows)
    chosen = {"all": set(rows), "none": set()}.get(spec, set(filter(None, spec.split(","))))
    if chosen - set(rows):
        raise SystemExit(f"error: --fractions names rows not run: {sorted(chosen - set(rows))}")
    return chosen


def summary(done: dict[str, list[dict]], data: dict, steps: dict[str, int], reference: str,
            n_folds: int) -> dict:
    """Pooled out-of-fold AUROCs with patient-level intervals, paired differences against raw
    pixels, init and ``reference``, and the per-fold AUROCs, of the rows with every fold;
    ``by_source``: the same pooled scores read on each NIH sample's films and patients apart
    (the probes are those trained on both samples); ``fractions``: per label fraction below
    1, the same for the probes trained on that share of each fold's training patients (each
    draw pooled over the folds, the draws averaged on the same resamples), for the rows that
    have every draw of every fold."""
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
    fractions = {}
    for fraction in FRACTIONS[:-1]:
        keys = [f"fraction/{fraction}/{d}" for d in range(DRAWS)]
        have = [row for row, folds in complete.items()
                if all(k in f.get("fractions", {}) for f in folds for k in keys)]
        if not have:
            continue
        values, samples = {}, {}
        for key in keys:  # each draw pooled over the folds, then the draws averaged
            drawn = {}
            for row in have:
                scores = np.empty(len(data["labels"]))
                for (_, test_idx), fold in zip(data["folds"], complete[row], strict=True):
                    scores[test_idx] = fold["fractions"][key]
                drawn[row] = scores
            v, smp, _ = resampled_aurocs(drawn, data["labels"], data["groups"], RESAMPLES)
            for row in have:
                values.setdefault(row, []).append(v[row])
                samples.setdefault(row, []).append(smp[row])
        fractions[str(fraction)] = summarise(
            {r: float(np.mean(v)) for r, v in values.items()},
            {r: np.mean(v, axis=0) for r, v in samples.items()},
            [(a, b) for a, b in pairs if a in have and b in have])
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
        "fractions": fractions,
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


def markdown_fractions(result: dict, aurocs: bool = True) -> str:
    """Each row's pooled AUROC by the share of training patients labelled (unless not
    ``aurocs``), then each row minus raw pixels, init and the reference by the same
    shares."""
    shares = list(result.get("fractions", {}))
    if not shares:
        return "(label fractions not measured)"
    tables = {**result["fractions"], "1.0": result}
    cols = [*shares, "1.0"]
    head = "| {} | " + " | ".join(f"{float(c):.0%} labelled" for c in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    lines = [head.format("row"), rule]
    for row in result["auroc"]:
        cells = [fmt_interval(tables[c]["auroc"][row]) if row in tables[c]["auroc"] else "—"
                 for c in cols]
        if any(c != "—" for c in cells[:-1]):
            lines.append(f"| {LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    lines = [*lines, ""] if aurocs else []
    lines += [head.format("difference"), rule]
    for pair in result["difference"]:
        cells = [fmt_interval(tables[c]["difference"][pair], signed=True)
                 if pair in tables[c]["difference"] else "—" for c in cols]
        if any(c != "—" for c in cells[:-1]):
            a, _, b = pair.partition(" - ")
            lines.append(f"| {a} minus {'raw pixels' if b == 'raw_pixels' else b} | "
                         + " | ".join(cells) + " |")
    inst = result["instrument"]
    lines += ["", f"Each share: {DRAWS} draws of the training patients in each of the "
                  f"{inst['folds']} folds (the same draws for every row), each draw's "
                  "out-of-fold scores pooled, the draws' AUROCs averaged."]
    return "\n".join(lines)


BLOCKS = {"table": markdown, "by-source": markdown_by_source, "fractions": markdown_fractions,
          "fraction-differences": lambda r: markdown_fractions(r, aurocs=False)}


def doc_with_table(doc: str, result: dict) -> str:
    """``doc`` with every ``<!-- folds: NAME -->`` block it holds (NAME one of
    :data:`BLOCKS`) regenerated from ``result``."""
    if "<!-- folds: " not in doc:
        raise SystemExit("error: a document of DOCS has no '<!-- folds: NAME -->' block")
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
    p.add_argument("--fractions", default=None,
                   help="rows also probed on 5/10/25/50 %% of each fold's training patients: "
                        "'all', 'none' or names (raw_pixels, init, recipes); default: those "
                        "of FRACTION_ROWS that run")
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
    rows = ("raw_pixels", "init", *steps)
    fractions = fraction_rows(args.fractions, rows)
    torch.set_num_threads(1)
    data = fold_data(args.folds, args.seed)
    out, reference = Path(args.out), next(iter(steps))
    done: dict[str, list[dict]] = {}
    for row in rows:
        done[row] = []
        for fold in range(args.folds):
            started = time.perf_counter()
            done[row].append(fold_scores(row, steps.get(row, 0), data, fold, out, args.seed,
                                         row in fractions))
            print(f"{row} fold {fold}: {time.perf_counter() - started:.0f} s", flush=True)
        result = summary(done, data, steps, reference, args.folds)
        Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.results} ({row} done)", flush=True)
    return result


if __name__ == "__main__":
    main()
