"""Screen pre-training recipes on the patient-level instrument (issue 37 §2), on one split.

::

    python -m studies.patient_screen --out runs/patient-screen [--set nih-demo|kermany] \\
        [--data-root ../shared/data/kermany-pediatric] [--seed 0] [--steps 180] \\
        [--recipes k05_intra_similar_g1,spcl,spcl_keep05,mae,simclr] \\
        [--stages primary,fraction,secondary,shortcut] \\
        [--results studies/results/patient-screen.json]

Sets (one fixed patient-disjoint split each, 30 % of the patients in test, so the test set
holds hundreds of patients to resample; one split rather than folds so that the CPU budget goes
to more recipes):

* ``nih-demo``: the embedded NIH films (1,785 films of 823 patients, 64 px; the split of
  :class:`spcl_fast.data.NIHDemo`). Pre-training sees its ``train`` split only. Primary
  endpoint normal vs abnormal, pooled and on the test patients of each NIH sample
  (``NIHDemo.source``) apart, each with its own intervals (``by_source`` in the results),
  and on the AP and the PA films apart (``by_view``): disease read within one view position
  cannot be view read as disease.
* ``kermany``: the pediatric set (``--data-root``, :func:`~spcl_fast.eval.endpoints.
  kermany_table`: one film per distinct file, 5,840 less duplicates), decoded once into
  ``<out>/kermany-64.npz`` at 64 px; patients cut by :func:`~spcl_fast.data.splits.
  assign_groups` with :data:`spcl_fast.data.nih_demo.FRACTIONS` (``val`` joins ``train``).
  The training patients' films are written as PNGs into ``<out>/kermany-pretrain/<patient>/``
  and pre-training reads them as ``--dataset folder``, whose own ``train`` cut keeps 90 % of
  those patient folders; no test patient is in the folder. Primary endpoint pneumonia vs
  normal; no findings, sex, age or view, so the audit is brightness and the permuted control.

Probes train on all training patients with their L2 strength chosen by grouped
cross-validation on them; every number is scored on the test patients.

Rows: raw pixels, the ViT at initialisation, and each recipe (a file of ``studies/recipes``
over the demo preset). The first recipe trains ``--steps`` steps and sets the budget; every
recipe's seconds per step are timed first, back to back (one thread each), and each other
recipe trains ``steps x (first's seconds per step) / (its own)`` steps, so all train about the
same seconds (the results show each row's measured seconds). For every row, by stage
(``--stages``, in this order, so a short screen can stop after ``primary``): the primary
endpoint by three readouts (linear probe on mean-pooled tokens, on the rich readout, kNN k=20
cosine; raw pixels: linear and kNN); label fractions 5/10/25/50/100 % of the training
patients (3 draws, linear on mean tokens); each NIH finding with >= 20 positives in train
and test; the shortcut audit (brightness, and on NIH sex, age, view; the permuted-label
negative control, 5 balanced permutations averaged). Intervals: the cluster bootstrap over
test patients, the same resamples for every row, so differences are paired.

Scores are kept per row (``<out>/<row>/<key>.npy``): a rerun skips finished rows and stages,
and the results file is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spcl_fast.data import NIHDemo
from spcl_fast.data.chestxray14 import CLASS_NAMES
from spcl_fast.data.images import load_square
from spcl_fast.data.nih_demo import FRACTIONS as SPLIT_FRACTIONS
from spcl_fast.data.nih_demo import SIZE, split_of
from spcl_fast.data.splits import assign_groups
from spcl_fast.eval.encoders import load_encoder
from spcl_fast.eval.endpoints import kermany_table, nih_endpoints
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
from spcl_fast.run.data import intensity_stats, load_split, normalizer
from spcl_fast.run.model import build_model

from .run import RECIPES, _train, run_config, seconds_per_step

ROOT = Path(__file__).resolve().parent.parent
KERMANY_ROOT = ROOT.parent / "shared" / "data" / "kermany-pediatric"
SETS = ("nih-demo", "kermany")
THREADS = {"num_workers": "0", "threads": "1"}
DRAWS = 3
RESAMPLES = 2000
STAGES = ("primary", "fraction", "secondary", "shortcut")


def instrument_data(set_name: str = "nih-demo", out: Path | None = None,
                    data_root: str | os.PathLike = KERMANY_ROOT) -> dict:
    """Every film of a set with its split role (``train`` / ``test`` indices), patient ids
    (``groups``), ``primary`` endpoint, secondary ``endpoints``, ``shortcuts`` targets,
    ``sources`` (the NIH sample of each film; ``None`` on one-source sets), ``views`` (AP or
    PA; absent where unknown), the overrides pre-training takes (``set``) and a description
    of the ``split``. ``out`` is where the
    pediatric set is decoded and written for pre-training (required for ``kermany``)."""
    if set_name == "nih-demo":
        return _nih_data()
    if set_name == "kermany":
        if out is None:
            raise ValueError("the kermany set needs an output folder for its 64 px copy")
        return _kermany_data(Path(data_root), Path(out))
    raise ValueError(f"unknown set {set_name!r}; choose from {', '.join(SETS)}")


def _nih_data() -> dict:
    everything = NIHDemo("all", label_set="findings")
    role = split_of(everything.patient_ids, everything.seed)
    train, test = np.flatnonzero(role != "test"), np.flatnonzero(role == "test")
    groups = np.asarray(everything.patient_ids, dtype=object)
    ends = nih_endpoints(everything.findings.numpy(), CLASS_NAMES, train, test)
    primary = ends.pop("abnormal")
    images = everything.images()
    shortcuts = shortcut_targets(images, train, primary, groups, everything.sexes,
                                 everything.ages, everything.view_positions)
    return {"images": images, "train": train, "test": test, "groups": groups,
            "primary": primary, "endpoints": ends, "shortcuts": shortcuts,
            "sources": np.asarray(everything.source),
            "views": np.asarray(everything.view_positions), "set": {"dataset": "nih-demo"},
            "primary_name": "normal vs abnormal",
            "split": "fixed patient-disjoint (NIHDemo: train+val / test, 30% of patients in "
                     "test); pre-training on train only"}


def kermany_arrays(root: Path, cache: Path) -> dict[str, np.ndarray]:
    """The pediatric films (:func:`kermany_table`) at 64 px as uint8 ``images (n, S, S)``,
    ``patient_ids``, ``labels`` (1 = pneumonia) and ``paths`` (relative to ``root``), decoded
    once into ``cache`` (``.npz``) and read back from it after."""
    if not cache.exists():
        if not (root / "manifest.csv").exists():
            raise SystemExit(f"error: {root} holds no manifest.csv (the kermany-pediatric copy "
                             f"of ../shared/data): give --data-root")
        table = kermany_table(root)
        images = np.stack([np.round(load_square(path, SIZE)[0] * 255).astype(np.uint8)
                           for path in table["paths"]])
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial")
        with partial.open("wb") as f:
            np.savez_compressed(f, images=images, patient_ids=np.asarray(table["patient_ids"]),
                                labels=np.asarray(table["labels"], np.uint8),
                                paths=np.asarray([os.path.relpath(q, root)
                                                  for q in table["paths"]]))
        os.replace(partial, cache)
    with np.load(cache, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _kermany_data(root: Path, out: Path) -> dict:
    from PIL import Image

    arrays = kermany_arrays(root, out / f"kermany-{SIZE}.npz")
    groups = arrays["patient_ids"].astype(object)
    role = assign_groups(list(groups), SPLIT_FRACTIONS)
    train, test = np.flatnonzero(role != "test"), np.flatnonzero(role == "test")
    folder = out / "kermany-pretrain"
    if not (folder / "done").exists():  # the training patients' films, one folder each
        for i in train:
            patient = folder / str(groups[i]).replace(":", "_")
            patient.mkdir(parents=True, exist_ok=True)
            name = Path(str(arrays["paths"][i])).with_suffix(".png").name
            Image.fromarray(arrays["images"][i]).save(patient / name)
        (folder / "done").touch()
    images = torch.from_numpy(arrays["images"][:, None]).float() / 255.0
    primary = arrays["labels"].astype(int)
    return {"images": images, "train": train, "test": test, "groups": groups,
            "primary": primary, "endpoints": {},
            "shortcuts": shortcut_targets(images, train, primary, groups),
            "sources": None, "set": {"dataset": "folder", "data_root": str(folder)},
            "primary_name": "pneumonia vs normal",
            "split": "fixed patient-disjoint (assign_groups over patient ids, 30% of patients "
                     "in test); pre-training on the films of the training patients in the "
                     "folder dataset's own train cut (90% of the patient folders)"}


def row_tasks(feats: dict[str, np.ndarray], data: dict, stages=STAGES, seed: int = 0) -> dict:
    """The probes of one row, by result key, in stage order: ``{key: thunk -> (n_test,)
    scores}`` for every readout, fraction draw, secondary endpoint and shortcut target."""
    tr, te, g = data["train"], data["test"], data["groups"]
    y = data["primary"]
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
            tasks[f"secondary/{name}"] = linear(mean, target)
    if "shortcut" in stages:
        for name, target in data["shortcuts"].items():
            tasks[f"shortcut/{name}"] = linear(mean, target)
    return tasks


def _features(row: str, data: dict, config, run_dir: Path | None) -> dict[str, np.ndarray]:
    # as the engine measures them: on the pre-training split's dataset
    stats = intensity_stats(config.data.dataset, load_split(config, "train")[0])
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
            partial = path.with_name(path.name + ".partial")
            with partial.open("wb") as f:  # complete or absent, for a screen beside this one
                np.save(f, task())
            os.replace(partial, path)
            print(f"{row} {key}: {time.perf_counter() - started:.0f} s", flush=True)
    return {p.stem.replace("__", "/"): np.load(p) for p in sorted(folder.glob("*.npy"))}


def tables(rows: dict[str, dict], data: dict, reference: str,
           within: np.ndarray | None = None, prefix: str = "") -> dict:
    """Intervals of every key (starting with ``prefix``) over the rows that have it, on one
    set of patient resamples; differences: each row minus raw pixels, init and ``reference``.
    ``within``: positions among the test films to score on (default all; a subset's patients
    are resampled on their own)."""
    te = data["test"]
    keep = np.arange(len(te)) if within is None else np.asarray(within)
    g = data["groups"][te][keep]
    keys = sorted({_drawn_from(k) for scores in rows.values() for k in scores
                   if k.startswith(prefix)})
    out = {}
    for key in keys:
        values, samples, each = {}, {}, {}
        for name, scores in rows.items():
            draws = [k for k in scores if _drawn_from(k) == key]
            if not draws:
                continue
            got = [resampled_aurocs({name: scores[k][keep]}, _target(k, data)[te][keep], g,
                                    RESAMPLES) for k in draws]
            each[name] = [v[0][name] for v in got]
            values[name] = float(np.mean(each[name]))
            samples[name] = np.mean([v[1][name] for v in got], axis=0)
        pairs = [(a, b) for a in values for b in ("raw_pixels", "init", reference)
                 if b in values and a != b and a not in ("raw_pixels", "init")]
        out[key] = summarise(values, samples, pairs)
        if any(len(v) > 1 for v in each.values()):  # the draws' own AUROCs: their spread
            out[key]["draws"] = each
    return out


def _drawn_from(key: str) -> str:
    """The key a draw's key averages into (``fraction/0.05/2``, ``shortcut/permuted/4``:
    a last part that is a draw number); any other key is its own."""
    parent, _, last = key.rpartition("/")
    return parent if last.isdigit() else key


def _target(key: str, data: dict) -> np.ndarray:
    kind, _, name = key.partition("/")
    if kind == "secondary":
        return data["endpoints"][name]
    if kind == "shortcut":
        return data["shortcuts"][name]
    return data["primary"]


def by_source(rows: dict[str, dict], data: dict, reference: str,
              column: str = "sources") -> dict:
    """The primary endpoint on each stratum's test patients apart, the strata being the
    values of ``data[column]`` (``sources``: the NIH samples; ``views``: AP and PA films),
    ``{stratum: {"test_films", "test_patients", "tables"}}``; empty where the set has no
    such column."""
    if data.get(column) is None:
        return {}
    te = data["test"]
    out = {}
    for stratum in sorted(set(data[column][te])):
        within = np.flatnonzero(data[column][te] == stratum)
        out[str(stratum)] = {"test_films": len(within),
                             "test_patients": len(set(data["groups"][te][within])),
                             "tables": tables(rows, data, reference, within, "primary/")}
    return out


def results(set_name: str, data: dict, rows: dict, runs: dict, reference: str, budget,
            started: float) -> dict:
    """The screen's results (what ``studies.patient_tables`` reads); ``reference``: the row
    every other is paired with besides raw pixels and init (the first recipe); the stages
    listed are those some row has scores of."""
    tr, te, g = data["train"], data["test"], data["groups"]
    return {
        "instrument": {"set": set_name, "endpoint": data["primary_name"],
                       "films": len(g), "train_films": len(tr), "test_films": len(te),
                       "train_patients": len(set(g[tr])), "test_patients": len(set(g[te])),
                       "split": data["split"],
                       "stages": [s for s in STAGES if any(k.startswith(s + "/")
                                                           for r in rows.values() for k in r)],
                       "resamples": RESAMPLES, "fraction_draws": DRAWS, "threads": 1},
        "budget_seconds": budget, "runs": runs, "reference": reference,
        "tables": tables(rows, data, reference),
        "by_source": by_source(rows, data, reference),
        "by_view": by_source(rows, data, reference, "views"),
        "seconds": time.time() - started,
        "environment": {"torch": torch.__version__, "machine": platform.machine(),
                        "note": "2 CPU cores shared with other jobs: seconds are noisy"},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.patient_screen",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--set", default="nih-demo", choices=SETS)
    p.add_argument("--data-root", default=str(KERMANY_ROOT),
                   help="the kermany-pediatric copy (--set kermany)")
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
    if args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}")
    if args.runs and args.set != "nih-demo":
        raise SystemExit("error: --runs are nih-demo runs: use them with --set nih-demo")
    out = Path(args.out)
    torch.set_num_threads(1)
    started = time.time()
    data = instrument_data(args.set, out, args.data_root)
    over = {**data["set"], **THREADS}
    base = run_config(over, recipes[0] if recipes else "k05_intra_similar_g1", args.seed,
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
    # every recipe's step time first, back to back, so that the ratios share one load
    step_s = {r: seconds_per_step(run_config(over, r, args.seed, args.steps),
                                  out / "timing" / r) for r in recipes}
    budget, reference = None, recipes[0] if recipes else next(iter(runs), "init")
    for recipe in recipes:
        steps = (args.steps if recipe == recipes[0]
                 else max(1, round(args.steps * step_s[recipes[0]] / step_s[recipe])))
        config = run_config(over, recipe, args.seed, steps).replace(probe=False)
        done = out / recipe / "summary.json"
        summary = json.loads(done.read_text()) if done.exists() else _train(config, out / recipe)
        budget = budget or summary["train_seconds"]
        runs[recipe] = {"description": RECIPES[recipe][0], "steps": summary["steps"],
                        "seconds_per_step": step_s[recipe],
                        "train_seconds": summary["train_seconds"],
                        "final_loss": summary["final_loss"]}
        rows[recipe] = evaluate_row(recipe, data, config, out, out / recipe, stages)
        write_results(args.results, results(args.set, data, rows, runs, reference, budget,
                                            started))
        print(f"wrote {args.results} ({recipe} done)", flush=True)
    final = results(args.set, data, rows, runs, reference, budget, started)
    write_results(args.results, final)
    print(f"wrote {args.results}")
    return final


if __name__ == "__main__":
    main()
