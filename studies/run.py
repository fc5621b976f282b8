"""The recipe study: does pre-training help, and which S-PCL settings make it help?

::

    python -m studies --out runs/study \\
        [--sets synthetic,chestxray14] [--cxr-root ../shared/data/chestxray14-mini] \\
        [--seeds 0,1,2] [--recipes spcl,spcl_image,...,mae] [--steps 180]
    python -m studies --out runs/ablations --seeds 0 --recipes ablations ...

(from a checkout of the repository: the studies are not part of the installed package).

Every recipe is the demo preset (:func:`spcl_fast.run.presets.demo`: ViT 6x192, patch 8,
64 px, batch 64) plus a few overrides (a file in ``studies/recipes/``), pre-trained for a
fixed CPU budget and linear-probed like the demo does (frozen mean-pooled features, L2 chosen
on val, mean AUROC on test). Each (set, recipe, seed) run also probes the same encoder at
initialisation (same seed, same input normalisation), so "init" rows come for free; "raw
pixels" is the same probe on the normalised pixels themselves. Every baseline method (MAE,
SimCLR) gets the training seconds of the first recipe's first seed, converted to steps with
its own measured step time (both timed on this machine in this study), so the comparison is
at equal time, not equal steps.

On the synthetic set the images are the built-in phantoms (train 2048 / val 512 / test 512).
On ``chestxray14`` the root is an official-layout folder (the sample
``../shared/data/chestxray14-mini``: pre-training and probe fitting on the train split of its
train_val images (625; a patient-disjoint 65 are the probe's val split), 14 labels, test =
the 310 official test images); the images are decoded once into a 64 px cache.

The study resumes: a finished run (its ``summary.json``) is read back, a killed one continues
from its last checkpoint. ``study.json`` holds every run and the mean +- std table, the table
is printed as Markdown (``docs/study.md``'s tables are made from the saved results by
``python -m studies.tables``), and ``study.png`` plots it. The seed spread is not the
only noise: the test sets are small (310 images, some labels with under 10 positives), so
``compare`` also gives each row's paired bootstrap over the test images against raw pixels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Annotated

import torch
import tyro

from spcl_fast.cli import THREADS_HELP, set_threads, tyro_cli
from spcl_fast.eval import extract_features, load_encoder, paired_bootstrap
from spcl_fast.eval.report import write_results
from spcl_fast.run.checkpoint import save_atomic
from spcl_fast.run.config import TrainConfig, apply_overrides
from spcl_fast.run.data import intensity_stats, load_split, materialize, normalizer
from spcl_fast.run.device import resolve_device
from spcl_fast.run.model import build_model
from spcl_fast.run.presets import PRESETS
from spcl_fast.train.engine import SetupError, probe_features, probe_splits, train

SETS = ("synthetic", "chestxray14")
RECIPE_DIR = Path(__file__).parent / "recipes"


def load_recipes(folder: Path = RECIPE_DIR) -> tuple[dict[str, tuple[str, dict[str, str]]],
                                                     tuple[str, ...]]:
    """The recipes (name -> (description, overrides of the demo preset)) and the names of the
    ablations, from one ``<name>.json`` per recipe: ``{"description": ..., "overrides":
    {"key": "value"}}``, optionally ``"base": <recipe>`` (its overrides first, then these) and
    ``"ablation": true`` (one change of ``spcl_keep05``, run by ``--recipes ablations``). The
    main recipes name every setting they change (keep, the intra-image weight and the batch
    grouping included), so they mean the same whatever the demo preset's defaults become."""
    raw = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, str]:
        if name in seen:
            raise ValueError(f"recipe {name!r} is its own base (via {' -> '.join(seen)})")
        if name not in raw:
            raise ValueError(f"recipe {seen[-1]!r} names an unknown base {name!r}")
        spec = raw[name]
        base = resolve(spec["base"], (*seen, name)) if "base" in spec else {}
        return {**base, **spec["overrides"]}

    recipes = {name: (spec["description"], resolve(name)) for name, spec in raw.items()}
    return recipes, tuple(name for name, spec in raw.items() if spec.get("ablation"))


RECIPES, ABLATIONS = load_recipes()
DEFAULT_RECIPES = ("k05_intra_similar_g1", "k05_intra", "spcl_keep05", "spcl", "mae", "simclr")


def set_overrides(name: str, cxr_root: str | None, cache_root: Path,
                  image_size: int) -> dict[str, str]:
    if name == "synthetic":  # named: the demo preset's own dataset is the NIH films
        return {"dataset": "synthetic"}
    if name == "chestxray14":
        if not cxr_root:
            raise SystemExit("error: --sets chestxray14 needs --cxr-root (an official-layout "
                             "folder)")
        return {"dataset": "chestxray14", "data_root": cxr_root, "num_workers": "0",
                "data_cache": str(_cxr_cache(cxr_root, cache_root, image_size))}
    raise SystemExit(f"error: unknown set {name!r}; choose from {', '.join(SETS)}")


def _cxr_cache(root: str, cache_root: Path, image_size: int) -> Path:
    """Decode the ChestX-ray14 folder once at the study's image size (resumes if
    interrupted)."""
    from spcl_fast.data.prepare import prepare

    out = cache_root / f"chestxray14-{image_size}"
    if not (out / "done").exists():
        try:
            report = prepare("chestxray14", root, str(out), image_size, workers=2)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        if not report["complete"]:
            raise SystemExit(f"error: the cache {out} is incomplete; run again to resume")
        (out / "done").touch()
    return out


def _method(recipe: str) -> str:
    return RECIPES[recipe][1].get("method", "spcl")


def base_config(preset: str = "demo") -> TrainConfig:
    """The preset every recipe overrides, with the end-of-run probe on (the study's
    measurement)."""
    return PRESETS[preset]().replace(probe=True)


def run_config(set_over: dict, recipe: str, seed: int, steps: int,
               preset: str = "demo") -> TrainConfig:
    over = {**set_over, **RECIPES[recipe][1], "seed": str(seed), "steps": str(steps)}
    return apply_overrides(base_config(preset), over)


def _train(config: TrainConfig, out: Path) -> dict:
    """Train (or read back, or continue) one run; returns its summary. A folder holding a run
    of other settings is an error, not something to reuse or overwrite."""
    saved = out / "config.json"
    # from_dict fills settings added since the run was made with their defaults
    differ = (TrainConfig.from_dict(json.loads(saved.read_text())).differences(config)
              if saved.exists() else [])
    if differ:
        raise SystemExit(f"error: {out} holds a run with other settings than this study asks for "
                         f"({'; '.join(differ)}): use another --out or remove it")
    done = out / "summary.json"
    if done.exists():
        summary = json.loads(done.read_text())
        if "probe" in summary:
            return summary
    try:
        summary = train(config, out, resume=out if out.exists() else None)
    except SetupError as exc:
        raise SystemExit(f"error: {exc}") from None
    if "interrupted" in summary:  # Ctrl-C / SIGTERM: the run is checkpointed, stop here
        raise SystemExit(summary["exit_code"])
    return summary


def seconds_per_step(config: TrainConfig, out: Path, steps: int = 12) -> float:
    """Median seconds of one training step over ``steps`` steps after 3 warm-up steps (a short
    run without probe, logging every step; read back if ``out`` already holds it)."""
    metrics, done = out / "metrics.jsonl", out / "summary.json"
    complete = (done.exists() and "interrupted" not in json.loads(done.read_text())
                and len(metrics.read_text().splitlines()) >= 3 + steps)
    if not complete:  # timings are only taken from one uninterrupted run: start it over
        shutil.rmtree(out, ignore_errors=True)
        summary = train(config.replace(probe=False, log_every=1, steps=3 + steps,
                                       warmup_steps=1), out)
        if "interrupted" in summary:
            raise SystemExit(summary["exit_code"])
    lines = metrics.read_text().splitlines()[3:3 + steps]
    return statistics.median(config.optim.batch_size / json.loads(x)["images_per_s"]
                             for x in lines)


def raw_pixel_probe(config: TrainConfig, splits: dict | None = None,
                    return_scores: bool = False) -> dict:
    """The demo's probe on the normalised pixels instead of encoder features (on ``splits``,
    default :func:`~spcl_fast.train.engine.probe_splits`)."""
    stats = intensity_stats(config.data.dataset, load_split(config, "train")[0],
                            config.data.num_workers)
    transform = normalizer(config.data.normalize, stats)
    return probe_features(config, probe_splits(config) if splits is None else splits,
                          lambda x: transform(x).flatten(1), return_scores=return_scores)


def _run_records(config: TrainConfig, run: Path, summary: dict, set_name: str, recipe: str,
                 with_init: bool, preset: TrainConfig) -> list[dict]:
    """The study's records of one finished run: the trained encoder's and, when ``with_init``,
    its initialisation's probe (and metadata probe on sets that have it); ``preset`` is the
    config the recipes override."""
    probe, base = summary["probe"], {"set": set_name, "recipe": recipe,
                                     "seed": config.run.seed}
    trained = {**base, "row": recipe, "steps": summary["steps"],
               "train_seconds": summary["train_seconds"], "final_loss": summary["final_loss"],
               "mean_auroc": probe["pretrained"]["mean_auroc"],
               "per_class_auroc": probe["pretrained"]["per_class_auroc"],
               "config": dataclasses.asdict(config)}
    records = [trained]
    if with_init:
        records.append({**base, "row": _init_row(config, preset),
                        "mean_auroc": probe["init"]["mean_auroc"],
                        "per_class_auroc": probe["init"]["per_class_auroc"]})
    scores = run / "probe_scores.pt"
    if scores.exists():  # (runs probed before the scores were saved have none)
        for record, key in zip(records, ("pretrained", "init"), strict=False):
            record["scores"] = {"file": str(scores), "key": key}
    meta = metadata_splits(config)
    if meta is not None:
        transform = normalizer(config.data.normalize, tuple(summary["intensity_stats"]))
        encoders = [load_encoder(run).encoder, build_model(config).encoder][:len(records)]
        for record, encoder in zip(records, encoders, strict=True):
            record["metadata_auroc"] = _encoder_metadata(config, meta, encoder, transform)
    return records


# Low-noise targets the ChestX-ray14 metadata holds: do the features carry anatomy at all?
# (name, dataset attribute, value that is the positive class)
METADATA = (("male", "sexes", "M"), ("PA view", "view_positions", "PA"))


def metadata_splits(config: TrainConfig) -> dict | None:
    """Probe splits whose labels are :data:`METADATA` (NaN where the release leaves a value
    out), for a dataset that has those attributes; ``None`` for one that has not."""
    splits = {}
    for split in ("train", "val", "test"):
        source, _, _ = load_split(config, split)
        # a --num-images run's train split is a Subset of the dataset
        dataset, rows = ((source.dataset, source.indices)
                         if isinstance(source, torch.utils.data.Subset) else (source, None))
        if not all(hasattr(dataset, attr) for _, attr, _ in METADATA):
            return None
        columns = [getattr(dataset, attr) for _, attr, _ in METADATA]
        if rows is not None:
            columns = [[col[j] for j in rows] for col in columns]
        targets = torch.tensor([[float(v == positive) if v else math.nan for v in col]
                                for col, (_, _, positive) in zip(columns, METADATA, strict=True)])
        targets = targets.T.reshape(-1, len(METADATA))
        images, targets = materialize(source, targets, num_workers=config.data.num_workers)
        splits[split] = (images, targets, [name for name, _, _ in METADATA])
    return splits


def _encoder_metadata(config, splits, encoder, transform) -> dict[str, float]:
    device = resolve_device(config.run.device)
    res = probe_features(config, splits, lambda x: extract_features(
        encoder.to(device), x, device=device, transform=transform))
    return res["per_class_auroc"]


def metadata_records(records: list[dict]) -> list[dict]:
    """One record per (record with a metadata probe, target), the target in place of the set,
    so :func:`summarise` and :func:`markdown` make its table."""
    return [{"set": name, "row": r["row"], "mean_auroc": r["metadata_auroc"][name]}
            for r in records if "metadata_auroc" in r for name, _, _ in METADATA]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict]) -> list[dict]:
    """Mean +- std over seeds of every (set, row) in ``records``."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        rows.setdefault((r["set"], r["row"]), []).append(r)
    table = []
    for (set_name, row), group in rows.items():
        m, s = mean_std([g["mean_auroc"] for g in group])
        entry = {"set": set_name, "row": row, "mean_auroc": m, "std": s, "seeds": len(group)}
        if group[0].get("train_seconds") is not None:
            entry["train_seconds"] = statistics.fmean(g["train_seconds"] for g in group)
            entry["steps"] = group[0]["steps"]
        table.append(entry)
    return table


def _scores(ref: dict) -> tuple[torch.Tensor, torch.Tensor]:
    saved = torch.load(ref["file"], map_location="cpu")
    return saved[ref["key"]], saved["labels"]


def compare(records: list[dict], baselines: tuple[str, ...] = ("raw pixels (dataset)",),
            resamples: int = 1000) -> list[dict]:
    """Every (set, row) whose runs all kept their test scores against each baseline row of the
    same set: the paired bootstrap over the test images of the row's mean AUROC minus the
    baseline's, each averaged over its seeds (:func:`~spcl_fast.eval.paired_bootstrap`). A
    baseline is a reference row (``raw pixels (dataset)``) or a recipe's."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        rows.setdefault((r["set"], r["row"]), []).append(r)
    out = []
    for (set_name, row), group in rows.items():
        if row in baselines or not all("scores" in g for g in group):
            continue
        scored = [_scores(g["scores"]) for g in group]
        labels = scored[0][1]
        for base in baselines:
            ref = rows.get((set_name, base))
            if not ref or not all("scores" in g for g in ref):
                continue
            base_scored = [_scores(g["scores"]) for g in ref]
            if not all(torch.equal(lab, labels) for _, lab in scored + base_scored):
                raise ValueError(f"{set_name}: {row} and {base} were not probed on the same "
                                 f"test images")
            res = paired_bootstrap([s for s, _ in scored], [s for s, _ in base_scored], labels,
                                   resamples=resamples)
            out.append({"set": set_name, "row": row, "baseline": base, "seeds": len(group),
                        "baseline_seeds": len(ref), **res})
    return out


def compare_markdown(comparisons: list[dict]) -> str:
    """One line per comparison: the difference, its 95% interval and the bootstrap's share of
    resamples in which the row is not above the baseline."""
    lines = ["| encoder | set | minus | difference [95% CI] | resamples not above |",
             "|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['row']} | {c['set']} | {c['baseline']} | {c['difference']:+.3f} "
                     f"[{c['low']:+.3f}, {c['high']:+.3f}] | {c['p_not_above']:.2f} |")
    return "\n".join(lines)


def markdown(table: list[dict], sets: list[str], timing: bool = True) -> str:
    """Rows in first-seen order; cells ``mean ± std``; with ``timing``, the pre-training budget
    (steps, mean training seconds per set) of trained rows."""
    rows = list(dict.fromkeys(t["row"] for t in table))
    cell = {(t["set"], t["row"]): t for t in table}
    head = "| encoder | " + " | ".join(f"{s} mean AUROC" for s in sets) + " |"
    if timing:
        head += " steps | train s (" + ", ".join(sets) + ") |"
    lines = [head, "|" + "---|" * (len(sets) + 1 + 2 * timing)]
    for row in rows:
        found = [cell.get((s, row)) for s in sets]
        cells = ["—" if t is None else f"{t['mean_auroc']:.3f}" if t["seeds"] == 1
                 else f"{t['mean_auroc']:.3f} ± {t['std']:.3f}" for t in found]
        timed = [t for t in found if t is not None and "steps" in t]
        steps = " / ".join(dict.fromkeys(str(t["steps"]) for t in timed)) or "—"
        seconds = ", ".join("—" if t is None or "steps" not in t else f"{t['train_seconds']:.0f}"
                            for t in found) if timed else "—"
        lines.append(f"| {row} | " + " | ".join(cells) + " |"
                     + (f" {steps} | {seconds} |" if timing else ""))
    return "\n".join(lines)


def expand_recipes(text: str) -> list[str]:
    """``--recipes``: comma-separated names, or ``ablations`` (keep 0.5, then each ablation
    of it)."""
    recipes = [r.strip() for r in text.split(",") if r.strip()]
    if recipes == ["ablations"]:
        recipes = ["spcl_keep05", *ABLATIONS]
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"error: unknown recipe {r!r}; choose from {', '.join(RECIPES)}")
    if not recipes or _method(recipes[0]) != "spcl":
        raise SystemExit("error: --recipes must start with an S-PCL recipe (it sets the "
                         "baselines' time budget)")
    return recipes


def plot(table: list[dict], sets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(t["row"] for t in table))
    cell = {(t["set"], t["row"]): t for t in table}
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 0.45 * len(rows) + 1.5),
                             squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        ys = [r for r in rows if (s, r) in cell]
        means = [cell[(s, r)]["mean_auroc"] for r in ys]
        stds = [cell[(s, r)]["std"] for r in ys]
        # references grey, the other methods orange, S-PCL recipes (main and ablations) blue
        colors = ["0.6" if r.startswith(("init", "raw")) else "C0" if r in RECIPES
                  and _method(r) == "spcl" else "C1" for r in ys]
        spread = any(cell[(s, r)]["seeds"] > 1 for r in ys)
        ax.barh(range(len(ys)), means, xerr=stds if spread else None, color=colors, capsize=3)
        ax.set_yticks(range(len(ys)), ys)
        ax.invert_yaxis()
        lo = min(means) - max(stds + [0]) - 0.03
        ax.set_xlim(max(0.0, lo), min(1.0, max(means) + max(stds + [0]) + 0.03))
        ax.axvline(0.5, color="k", lw=0.5)
        ax.set_xlabel("test mean AUROC (linear probe)"
                      + (",\nmean ± std over seeds" if spread else ", one seed"))
        ax.set_title(s)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class StudyArgs:
    """The study's flags (tyro reads each field's comment as its help)."""

    out: str = "runs/study"  # study folder (resumable)
    sets: Annotated[str, tyro.conf.arg(help=f"comma-separated, from {', '.join(SETS)}")] = (
        "synthetic,chestxray14")
    cxr_root: str | None = None  # ChestX-ray14 folder in the official layout (the mini sample)
    seeds: str = "0,1,2"  # comma-separated seeds
    recipes: Annotated[str, tyro.conf.arg(help=(
        f"comma-separated, from {', '.join(RECIPES)}; or 'ablations' (the keep 0.5 recipe and "
        f"each ablation of it)"))] = ",".join(DEFAULT_RECIPES)
    # the preset every recipe overrides (a name of spcl_fast.run.presets; smoke: seconds)
    preset: str = "demo"
    steps: int | None = None  # steps of every S-PCL recipe (None: the preset's; MAE: by time)
    # comma-separated rows every other row is bootstrapped against: reference rows
    # ('raw pixels (dataset)', 'init (dataset)') or recipes
    compare_to: str = "raw pixels (dataset)"
    threads: Annotated[int | None, tyro.conf.arg(help=THREADS_HELP)] = None


def parse_args(argv: list[str] | None = None) -> StudyArgs:
    """The study's flags; a bad one ends in one ``error:`` line."""
    import sys

    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(StudyArgs)]
    return tyro_cli(lambda args, prog: tyro.cli(StudyArgs, args=args, prog=prog,
                                                description=__doc__.split("\n\n")[0]),
                    sys.argv[1:] if argv is None else argv, "python -m studies", flags)


def _checked(args) -> tuple[list[str], list[str], list[int], Path]:
    """The study's sets, recipes, seeds and output folder, every choice checked before the
    first run (a study takes hours): a bad one ends with one ``error:`` line."""
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    recipes = expand_recipes(args.recipes)
    # Every choice is checked before the first run: a study takes hours.
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds takes integers like 0,1,2, got {args.seeds!r}") from None
    unknown = [s for s in sets if s not in SETS]
    if unknown or not sets:
        named = f"unknown set {', '.join(map(repr, unknown))}" if unknown else "no set named"
        raise SystemExit(f"error: {named}; choose from {', '.join(SETS)}")
    if "chestxray14" in sets and not args.cxr_root:
        raise SystemExit("error: --sets chestxray14 needs --cxr-root (an official-layout "
                         "folder)")
    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown --preset {args.preset!r}; choose from "
                         f"{', '.join(PRESETS)}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"error: cannot use --out {out}: {exc.strerror or exc}") from None
    return sets, recipes, seeds, out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sets, recipes, seeds, out = _checked(args)
    print(set_threads(args.threads), flush=True)
    base = base_config(args.preset)
    records, started = [], time.time()
    for set_name in sets:
        set_over = set_overrides(set_name, args.cxr_root, out / "cache", base.data.image_size)
        budget_s, step_s, init_seen = None, {}, set()
        for recipe in recipes:
            for seed in seeds:
                steps = args.steps or base.optim.steps
                if _method(recipe) != "spcl":  # equal wall-clock: the first recipe's time
                    if recipe not in step_s:  # in this baseline's own steps
                        step_s[recipe] = seconds_per_step(
                            run_config(set_over, recipe, 0, steps, args.preset),
                            out / set_name / f"timing-{recipe}")
                    steps = max(1, round(budget_s / step_s[recipe]))
                run = out / set_name / recipe / f"seed{seed}"
                config = run_config(set_over, recipe, seed, steps, args.preset)
                print(f"== {set_name} / {recipe} / seed {seed}: {steps} steps -> {run}",
                      flush=True)
                summary = _train(config, run)
                if budget_s is None:
                    budget_s = summary["train_seconds"]
                new_init = config.method == "spcl" and _init_key(config, seed) not in init_seen
                init_seen.add(_init_key(config, seed))
                records += _run_records(config, run, summary, set_name, recipe, new_init,
                                        base)
        used = [run_config(set_over, r, 0, 1, args.preset).data.normalize for r in recipes]
        for norm in dict.fromkeys(["dataset", "image", *used]):
            config = apply_overrides(base, {**set_over, "normalize": norm})
            splits = probe_splits(config)
            raw = raw_pixel_probe(config, splits, return_scores=True)
            scores = out / set_name / f"raw-pixels-{norm}-scores.pt"
            save_atomic({"labels": splits["test"][1], "pixels": raw.pop("test_scores")}, scores)
            # Deterministic (no seed enters), so one record: its std 0 is no seed spread.
            record = {"set": set_name, "row": f"raw pixels ({norm})", "seed": None,
                      "mean_auroc": raw["mean_auroc"], "per_class_auroc": raw["per_class_auroc"],
                      "scores": {"file": str(scores), "key": "pixels"}}
            meta = metadata_splits(config)
            if meta is not None:
                record["metadata_auroc"] = raw_pixel_probe(config, meta)["per_class_auroc"]
            records.append(record)
    table = summarise(records)
    text = markdown(table, sets)
    meta_table = summarise(metadata_records(records))
    meta_text = markdown(meta_table, [name for name, _, _ in METADATA], timing=False)
    comparisons = compare(records, tuple(b.strip() for b in args.compare_to.split(",")))
    print(text)
    if comparisons:
        print(f"\npaired bootstrap over the test images:\n{compare_markdown(comparisons)}")
    if meta_table:
        print(f"\nmetadata probe (sex, view position) on the chestxray14 set:\n{meta_text}")
    result = {"sets": sets, "seeds": seeds, "recipes": {r: RECIPES[r][0] for r in recipes},
              "table": table, "markdown": text, "runs": records,
              "metadata_table": meta_table, "metadata_markdown": meta_text if meta_table else "",
              "compare": comparisons, "compare_markdown": compare_markdown(comparisons),
              "seconds": time.time() - started, "environment": _environment()}
    write_results(out / "study.json", result)
    plot(table, sets, out / "study.png")
    print(f"wrote {out / 'study.json'} and {out / 'study.png'}")
    return result


def _init_key(config, seed: int) -> tuple:
    """The same seed's encoder at initialisation is recorded once per input normalisation, kind
    of position embedding, patch size, pooling, patch normalisation and size (what decides the
    initial encoder, its input and its features)."""
    model = config.model
    return (config.data.normalize, model.pos_embed, model.patch_size, model.class_token,
            model.patch_norm, model.embed_dim, model.depth, seed)


def _init_row(config: TrainConfig, base: TrainConfig) -> str:
    """The init row's name: what sets the initial encoder apart from the base preset's."""
    model = config.model
    pos = "" if model.pos_embed == "sincos" else f", {model.pos_embed} pos"
    patch = "" if model.patch_size == base.model.patch_size else f", patch {model.patch_size}"
    cls = ", cls token" if model.class_token else ""
    norm = "" if model.patch_norm == "none" else f", patch norm {model.patch_norm}"
    size = ("" if (model.embed_dim, model.depth) == (base.model.embed_dim, base.model.depth)
            else f", {model.depth}x{model.embed_dim}")
    return f"init ({config.data.normalize}{pos}{patch}{cls}{norm}{size})"


def _environment() -> dict:
    """Where the times of a study were taken: versions, machine, threads, commit."""
    import platform
    import subprocess

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "commit": commit}


if __name__ == "__main__":
    main()
