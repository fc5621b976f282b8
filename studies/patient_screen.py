"""Screen pre-training recipes on the patient-level instrument (issue 37 §2), on one split.

::

    python -m studies.patient_screen --out runs/patient-screen \\
        [--recipes k05_intra_similar_g1,spcl,spcl_keep05,mae,simclr] [--steps 180]
        [--results studies/results/patient-screen.json]

Data: the embedded NIH films (``nih-demo``, 1,785 films of 823 patients, 64 px). One fixed
patient-disjoint split (:class:`spcl_fast.data.NIHDemo`: 30 % of the patients in test, so the
test set holds about 250 patients to resample; one split rather than folds so that the CPU
budget goes to more recipes). Pre-training sees the ``train`` split only; probes train on
``train`` + ``val`` (all training patients) with their L2 strength chosen by grouped
cross-validation on them; every number is scored on the test patients.

Rows: raw pixels, the ViT at initialisation, and each recipe (a file of ``studies/recipes``
over the demo preset), every recipe given the training seconds of the first one (its
``--steps`` steps; the others' step counts come from their own measured seconds per step, one
thread each). For every row: the primary endpoint (normal vs abnormal) by three readouts
(linear probe on mean-pooled tokens, on the rich readout, kNN k=20 cosine; raw pixels: linear
and kNN), label fractions 5/10/25/50/100 % of the training patients (3 draws, linear on mean
tokens), each finding with >= 20 positives in train and test, and the shortcut audit
(brightness, sex, age, view; the permuted-label negative control). Intervals: the cluster
bootstrap over test patients, the same resamples for every row, so differences are paired.

Scores are kept per row (``<out>/<row>/scores.npz``): a rerun skips finished rows, and the
results file is rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spcl_fast.data import NIHDemo
from spcl_fast.data.chestxray14 import CLASS_NAMES
from spcl_fast.eval.encoders import load_encoder
from spcl_fast.eval.endpoints import nih_endpoints
from spcl_fast.eval.patient import (
    FRACTIONS,
    knn_scores,
    label_fraction_draws,
    pixel_features,
    probe_scores,
    readout_features,
    resampled_aurocs,
    shortcut_targets,
    summarise,
)
from spcl_fast.eval.report import write_results
from spcl_fast.run.data import intensity_stats, normalizer
from spcl_fast.run.model import build_model

from .run import RECIPES, _train, run_config, seconds_per_step

SET = {"dataset": "nih-demo", "num_workers": "0", "threads": "1"}
DRAWS = 3
RESAMPLES = 2000


def instrument_data() -> dict:
    """Every film with its split role, endpoints and shortcut targets."""
    everything = NIHDemo("all", label_set="findings")
    role = np.array([{"train": "train", "val": "train", "test": "test"}[s] for s in
                     _splits(everything)])
    train, test = np.flatnonzero(role == "train"), np.flatnonzero(role == "test")
    groups = np.asarray(everything.patient_ids, dtype=object)
    findings = everything.findings.numpy()
    ends = nih_endpoints(findings, CLASS_NAMES, train, test)
    images = everything.images()
    shortcuts = shortcut_targets(images, train, ends["abnormal"], groups, everything.sexes,
                                 everything.ages, everything.view_positions)
    return {"images": images, "train": train, "test": test, "groups": groups,
            "endpoints": ends, "shortcuts": shortcuts}


def _splits(ds: NIHDemo) -> list[str]:
    from spcl_fast.data.nih_demo import split_of

    return list(split_of(ds.patient_ids, ds.seed))


STAGES = ("primary", "fraction", "secondary", "shortcut")


def row_tasks(feats: dict[str, np.ndarray], data: dict, stages=STAGES, seed: int = 0) -> dict:
    """The probes of one row, by result key, in stage order: ``{key: thunk -> (n_test,)
    scores}`` for every readout, fraction draw, secondary endpoint and shortcut target."""
    tr, te, g = data["train"], data["test"], data["groups"]
    y = data["endpoints"]["abnormal"]
    mean = feats["mean"]

    def linear(x, target, idx=tr):
        return lambda: probe_scores(x[idx], target[idx], g[idx], x[te], seed=seed)[0]

    tasks = {}
    if "primary" in stages:
        tasks["primary/linear"] = linear(mean, y)
        tasks["primary/knn"] = lambda: knn_scores(mean[tr], y[tr], mean[te])
        if "rich" in feats:
            tasks["primary/linear_rich"] = linear(feats["rich"], y)
    if "fraction" in stages:
        for (fraction, draw), sub in label_fraction_draws(g[tr], FRACTIONS, DRAWS,
                                                          seed).items():
            if fraction < 1:
                tasks[f"fraction/{fraction}/{draw}"] = linear(mean, y, tr[sub])
    if "secondary" in stages:
        for name, target in data["endpoints"].items():
            if name != "abnormal":
                tasks[f"secondary/{name}"] = linear(mean, target)
    if "shortcut" in stages:
        for name, target in data["shortcuts"].items():
            tasks[f"shortcut/{name}"] = linear(mean, target)
    return tasks


def _features(row: str, data: dict, config, run_dir: Path | None) -> dict[str, np.ndarray]:
    stats = intensity_stats("nih-demo", NIHDemo("train").images())  # as the engine measures
    if row == "raw_pixels":
        transform = normalizer(config.data.normalize, stats)
        return {"mean": pixel_features(data["images"], transform)}
    if row == "init":
        encoder, transform = build_model(config).encoder, normalizer(config.data.normalize,
                                                                     stats)
    else:
        loaded = load_encoder(run_dir)
        encoder, transform = loaded.encoder, loaded.transform()
    return readout_features(encoder.eval(), data["images"], transform)


def evaluate_row(row: str, data: dict, config, out: Path, run_dir: Path | None = None,
                 stages=STAGES) -> dict:
    """The row's test scores of ``stages``, each key computed once and kept as
    ``out/<row>/<key>.npy`` (features in ``out/<row>/features.npz``); returns every key kept."""
    folder = out / row
    folder.mkdir(parents=True, exist_ok=True)
    cached = folder / "features.npz"
    if cached.exists():
        with np.load(cached) as z:
            feats = {k: z[k] for k in z.files}
    else:
        feats = _features(row, data, config, run_dir)
        np.savez(cached, **feats)
    for key, task in row_tasks(feats, data, stages, config.run.seed).items():
        path = folder / (key.replace("/", "__") + ".npy")
        if not path.exists():
            started = time.perf_counter()
            np.save(path, task())
            print(f"{row} {key}: {time.perf_counter() - started:.0f} s", flush=True)
    return {p.stem.replace("__", "/"): np.load(p) for p in sorted(folder.glob("*.npy"))}


def tables(rows: dict[str, dict], data: dict, reference: str) -> dict:
    """Intervals of every key over the rows that have it, on one set of patient resamples;
    differences: each row minus raw pixels, init and ``reference``."""
    te, g = data["test"], data["groups"][data["test"]]
    keys = sorted({k.rsplit("/", 1)[0] if k.startswith("fraction/") else k
                   for scores in rows.values() for k in scores})
    out = {}
    for key in keys:
        values, samples = {}, {}
        for name, scores in rows.items():
            draws = [k for k in scores if k == key or k.startswith(key + "/")]
            if not draws:
                continue
            target = _target(key, data)[te]
            got = [resampled_aurocs({name: scores[k]}, target, g, RESAMPLES) for k in draws]
            values[name] = float(np.mean([v[0][name] for v in got]))
            samples[name] = np.mean([v[1][name] for v in got], axis=0)
        pairs = [(a, b) for a in values for b in ("raw_pixels", "init", reference)
                 if b in values and a != b and a not in ("raw_pixels", "init")]
        out[key] = summarise(values, samples, pairs)
    return out


def _target(key: str, data: dict) -> np.ndarray:
    kind, _, name = key.partition("/")
    if kind == "secondary":
        return data["endpoints"][name]
    if kind == "shortcut":
        return data["shortcuts"][name]
    return data["endpoints"]["abnormal"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.patient_screen",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--recipes", default="k05_intra_similar_g1,spcl,spcl_keep05,mae,simclr")
    p.add_argument("--runs", default="",
                   help="finished runs to add as rows, name=run_folder,... (trained on "
                        "nih-demo's train split, e.g. the demo)")
    p.add_argument("--steps", type=int, default=180)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--results", default="studies/results/patient-screen.json")
    args = p.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    stages = [s for s in args.stages.split(",") if s]
    unknown = [r for r in recipes if r not in RECIPES] + [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"error: unknown recipe(s) or stage(s) {unknown}")
    out = Path(args.out)
    torch.set_num_threads(1)
    started = time.time()
    data = instrument_data()
    base = run_config(SET, recipes[0] if recipes else "k05_intra_similar_g1", args.seed,
                      args.steps)
    rows = {name: evaluate_row(name, data, base, out, stages=stages)
            for name in ("raw_pixels", "init")}
    runs = {}
    for spec in filter(None, args.runs.split(",")):
        name, _, folder = spec.partition("=")
        summary = json.loads((Path(folder) / "summary.json").read_text())
        runs[name] = {"run": folder, "steps": summary["steps"],
                      "train_seconds": summary["train_seconds"],
                      "final_loss": summary["final_loss"]}
        rows[name] = evaluate_row(name, data, base, out, Path(folder), stages)
    budget = None
    for recipe in recipes:
        step_s = seconds_per_step(run_config(SET, recipe, args.seed, args.steps),
                                  out / "timing" / recipe)
        steps = args.steps if budget is None else max(1, round(budget / step_s))
        config = run_config(SET, recipe, args.seed, steps).replace(probe=False)
        done = out / recipe / "summary.json"
        summary = json.loads(done.read_text()) if done.exists() else _train(config, out / recipe)
        budget = budget or summary["train_seconds"]
        runs[recipe] = {"description": RECIPES[recipe][0], "steps": steps,
                        "seconds_per_step": step_s, "train_seconds": summary["train_seconds"],
                        "final_loss": summary["final_loss"]}
        rows[recipe] = evaluate_row(recipe, data, config, out, out / recipe, stages)
    reference = next(iter(runs), "init")
    results = {
        "instrument": {"set": "nih-demo", "films": len(data["groups"]),
                       "train_films": len(data["train"]), "test_films": len(data["test"]),
                       "train_patients": len(set(data["groups"][data["train"]])),
                       "test_patients": len(set(data["groups"][data["test"]])),
                       "split": "fixed patient-disjoint (NIHDemo: train+val / test, 30% of "
                                "patients in test); pre-training on train only",
                       "stages": stages, "resamples": RESAMPLES, "fraction_draws": DRAWS,
                       "threads": 1},
        "budget_seconds": budget, "runs": runs, "reference": reference,
        "tables": tables(rows, data, reference),
        "seconds": time.time() - started,
        "environment": {"torch": torch.__version__, "machine": platform.machine(),
                        "note": "2 CPU cores shared with other jobs: seconds are noisy"},
    }
    write_results(args.results, results)
    print(f"wrote {args.results}")
    return results


if __name__ == "__main__":
    main()
