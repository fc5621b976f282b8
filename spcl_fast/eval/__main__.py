"""``python -m spcl_fast.eval {linear-probe,finetune,segment}``: downstream evaluation.

Examples::

    python -m spcl_fast.eval linear-probe --checkpoint runs/demo --dataset synthetic --out ev/lp
    python -m spcl_fast.eval linear-probe --checkpoint none --model runs/demo --out ev/lp-init
    python -m spcl_fast.eval finetune --checkpoint runs/x --dataset chestxray14 --root R \\
        --label-fraction 0.1 --epochs 10 --out ev/ft
    python -m spcl_fast.eval segment --checkpoint runs/x --dataset siim --root R --out ev/seg

Every run writes ``results.json`` (all numbers, the exact arguments, dataset sizes, the label
fraction, the encoder's source and any listed files not evaluated) and, for the classification
tasks, ``roc_curves.png`` (``segment``: ``segment_examples.png``) into ``--out``, and prints a
table. Bad flags, checkpoints and data files end the run with one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import tyro

from .. import __version__
from .. import data as data_lib
from ..cli import set_threads, tyro_cli
from ..data.errors import one_line
from ..run.config import Normalize
from ..run.data import intensity_stats
from ..run.device import resolve_device
from .encoders import EncoderLoadError, load_encoder
from .finetune import FinetuneSettings, finetune
from .label_fraction import DEFAULT_SEED, DatasetView, label_fraction_view, patient_ids_of
from .linear_probe import L2_GRID, extract_dataset_features, linear_probe
from .report import (
    auroc_table,
    dice_table,
    plot_roc_curves,
    plot_segment_examples,
    write_results,
)
from .segment import SegmentSettings, has_masks, segment

TASKS = ("linear-probe", "finetune", "segment")
DEFAULT_BATCH = {"linear-probe": 256, "finetune": 64, "segment": 32}


@dataclass
class EvalArgs:
    """The flags every task takes (tyro reads each field's comment as its help)."""

    # spcl_fast run folder or ckpt-*.pt, an export folder, a timm/MAE state dict
    # (.pth/.pt/.safetensors), or 'none' (random init)
    checkpoint: str
    # preset for 'none' and the head count of timm/MAE weights; with 'none' also a run
    # folder/checkpoint whose architecture to init
    model: str | None = None
    dataset: str = "synthetic"  # a name from spcl_fast.data
    root: str | None = None  # dataset folder (real datasets)
    cache: str | None = None  # preprocessing cache folder
    # default: the run's image size, else the grid of external weights, else 224
    image_size: int | None = None
    patch_size: int | None = None  # patch of a 'none' preset
    normalize: Normalize | None = None  # override the encoder's input normalisation
    label_fraction: float = 1.0  # fraction of training PATIENTS whose labels are used
    fraction_seed: int = DEFAULT_SEED  # seed of the patient sample (keep it equal across methods)
    max_images: int | None = None  # use only the first N items of each split (smoke runs)
    out: str | None = None  # folder for results.json and plots
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    batch_size: int | None = None  # images per batch (None: 256, 64, 32 by task)
    workers: Annotated[int, tyro.conf.arg(aliases=("--num-workers",))] = 0  # DataLoader workers
    threads: int | None = None  # CPU threads for torch (None: torch's default, often all cores)


@dataclass
class LinearProbeArgs(EvalArgs):
    task: ClassVar[str] = "linear-probe"
    l2_grid: tuple[float, ...] = L2_GRID  # L2 strengths tried (the best on val is kept)
    probe_steps: int = 300  # L-BFGS iterations per L2 strength


@dataclass
class FinetuneArgs(EvalArgs):
    task: ClassVar[str] = "finetune"
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)


@dataclass
class SegmentArgs(EvalArgs):
    task: ClassVar[str] = "segment"
    settings: SegmentSettings = field(default_factory=SegmentSettings)


TASKS = {cls.task: cls for cls in (LinearProbeArgs, FinetuneArgs, SegmentArgs)}
BUILT_IN = ("synthetic", "nih-demo")  # datasets shipped with the package: no --root
DEFAULT_BATCH = {"linear-probe": 256, "finetune": 64, "segment": 32}


def _flags(cls) -> list[str]:
    """Every ``--flag`` of a task's arguments (nested settings without their prefix; yes/no
    fields also as ``--no-flag``), for suggestions."""
    flags = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)
                                                and dataclasses.is_dataclass(f.default_factory)):
            flags += _flags(f.default_factory)
            continue
        flag = "--" + f.name.replace("_", "-")
        flags += [flag, "--no-" + flag[2:]] if f.type in (bool, "bool") else [flag]
    return flags


def parse_args(argv: list[str]) -> EvalArgs:
    """The task's arguments (tyro: one subcommand per task, flags without prefixes); bad input
    ends in one ``error:`` line."""
    flags = {f for cls in TASKS.values() for f in _flags(cls)} | {"--num-workers"}
    return tyro_cli(
        lambda args, prog: tyro.extras.subcommand_cli_from_dict(
            TASKS, args=args, prog=prog, description=__doc__,
            config=(tyro.conf.OmitArgPrefixes,)),
        argv, "python -m spcl_fast.eval", flags=sorted(flags), subcommands=list(TASKS))


class EvalError(Exception):
    """A user error: reported as one line, no traceback."""


def check_args(args) -> None:
    """Reject flag values no evaluation can use, before anything is loaded."""
    rules = [
        ("--label-fraction", args.label_fraction, 0 < args.label_fraction <= 1, "in (0, 1]"),
        ("--batch-size", args.batch_size, args.batch_size is None or args.batch_size >= 1,
         ">= 1"),
        ("--max-images", args.max_images, args.max_images is None or args.max_images >= 1,
         ">= 1"),
        ("--workers", args.workers, args.workers >= 0, ">= 0"),
        ("--threads", args.threads, args.threads is None or args.threads >= 1, ">= 1"),
    ]
    if args.task == "linear-probe":
        rules += [("--probe-steps", args.probe_steps, args.probe_steps >= 1, ">= 1"),
                  ("--l2-grid", args.l2_grid, min(args.l2_grid) >= 0, "a list of values >= 0")]
    for flag, value, ok, want in rules:
        if not ok:
            raise EvalError(f"{flag} must be {want}, got {value}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalError(f"--out {args.out} is a file, not a folder")


def task_settings(args):
    """The fine-tuning / segmentation settings of the flags (``None`` for the linear probe)."""
    if args.task == "linear-probe":
        return None
    settings = dataclasses.replace(args.settings, num_workers=args.workers,
                                   batch_size=args.batch_size or DEFAULT_BATCH[args.task])
    try:
        settings.check()
        return settings
    except ValueError as exc:  # the message starts with the field; the flag is its dashed form
        field_name, rest = str(exc).split(" ", 1)
        raise EvalError(f"--{field_name.replace('_', '-')} {rest}") from exc


def build_splits(args, image_size: int) -> dict:
    """train/val/test of ``args.dataset`` at ``image_size``, the label fraction applied to
    train by patient, ``--max-images`` to every split."""
    if args.dataset not in data_lib.DATASETS:
        raise EvalError(f"unknown dataset {args.dataset!r}; choose from "
                        f"{', '.join(data_lib.DATASETS)}")
    if args.dataset not in BUILT_IN:
        if not args.root:
            raise EvalError(f"--root is required for dataset {args.dataset!r}")
        if not Path(args.root).exists():
            raise EvalError(f"dataset root not found: {args.root}")
    kwargs = {"cache": args.cache} if args.cache else {}
    splits, skipped = {}, {}
    for split in ("train", "val", "test"):
        try:
            ds = data_lib.build_dataset(args.dataset, args.root, split, image_size, **kwargs)
        except (FileNotFoundError, ValueError) as exc:
            raise EvalError(f"cannot build {args.dataset}/{split}: {exc}") from exc
        if args.task != "segment" and not len(ds.class_names):
            raise EvalError(f"{args.task} needs labels; dataset {args.dataset!r} has none (it "
                            "is for pre-training only: evaluate on a labelled dataset)")
        skipped[split] = dict(getattr(ds, "skipped", {}))  # absent, or unreadable in the cache
        if args.max_images is not None:
            ds = DatasetView(ds, range(min(args.max_images, len(ds))))
        if len(ds) == 0:
            raise EvalError(f"the {split} split of {args.dataset} ({args.root}) is empty"
                            + (" (--max-images)" if args.max_images is not None else ""))
        splits[split] = ds
    splits["_skipped"] = skipped
    full_train = splits["full_train"] = splits["train"]
    splits["train"] = label_fraction_view(full_train, args.label_fraction, args.fraction_seed)
    splits["_train_patients"] = (len(set(patient_ids_of(full_train))),
                                 len(set(patient_ids_of(splits["train"]))))
    return splits


def classes_without_both_labels(dataset) -> list[str]:
    """The classes of ``dataset`` (``labels (n, C)``, NaN unknown) that have no positive or no
    negative label: a classifier trained on them learns nothing about that class."""
    labels = torch.as_tensor(dataset.labels, dtype=torch.float32)
    positive, negative = (labels == 1).any(dim=0), (labels == 0).any(dim=0)
    return [name for name, p, n in zip(dataset.class_names, positive.tolist(),
                                       negative.tolist(), strict=True) if not (p and n)]


def _dataset_info(args, splits, image_size) -> dict:
    total, used = splits["_train_patients"]
    return {
        "name": args.dataset, "root": args.root, "image_size": image_size,
        "sizes": {s: len(splits[s]) for s in ("train", "val", "test")},
        "class_names": list(splits["test"].class_names),
        "label_fraction": args.label_fraction, "fraction_seed": args.fraction_seed,
        "train_patients": used, "train_patients_total": total,
        "skipped": splits["_skipped"],  # id -> reason, per split: listed but not evaluated
        # classes the training labels cannot teach (no positive or no negative among them)
        "classes_without_both_labels": classes_without_both_labels(splits["train"]),
    }


def run(args: EvalArgs) -> dict:
    """Run one evaluation task from parsed arguments; returns the results dict."""
    started = time.perf_counter()
    check_args(args)
    threads = set_threads(args.threads)
    settings = task_settings(args)
    try:
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise EvalError(str(exc)) from exc
    try:
        loaded = load_encoder(args.checkpoint, model=args.model, image_size=args.image_size,
                              patch_size=args.patch_size, normalize=args.normalize)
    except (EncoderLoadError, FileNotFoundError, ValueError) as exc:
        raise EvalError(str(exc)) from exc
    image_size = loaded.image_size
    splits = build_splits(args, image_size)
    if args.task == "segment" and not has_masks(splits["test"]):
        raise EvalError(f"segment needs a dataset with masks (e.g. siim); {args.dataset!r} "
                        "items have no 'mask'")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if loaded.stats is None and loaded.normalize == "dataset":
        loaded.stats = intensity_stats(args.dataset, splits["full_train"])
        loaded.notes.append("intensity mean/std measured on the evaluated training split")
    encoder, transform = loaded.encoder.to(device), loaded.transform()
    train, val, test = splits["train"], splits["val"], splits["test"]
    class_names = list(test.class_names)
    print(f"{args.task}: encoder {loaded.kind} ({loaded.source}), {image_size}px, normalize "
          f"{loaded.normalize}; {args.dataset} train {len(train)} / val {len(val)} / test "
          f"{len(test)}, label fraction {args.label_fraction}; device {device}; {threads}")
    for note in loaded.notes:
        print(f"  note: {note}")
    if args.task != "segment" and (untrained := classes_without_both_labels(train)):
        print(f"  warning: {', '.join(untrained)} have no positive or no negative training "
              f"label among the {len(train)} training images (label fraction "
              f"{args.label_fraction}): their probe learns nothing from labels, so their test "
              "AUROC measures nothing learned; raise --label-fraction")
    if any(splits["_skipped"].values()):
        counts = ", ".join(f"{k} {len(v)}" for k, v in splits["_skipped"].items() if v)
        print(f"  note: listed files not evaluated (absent or unreadable): {counts}; ids and "
              "reasons in results.json")

    if args.task == "linear-probe":
        bs = args.batch_size or DEFAULT_BATCH[args.task]
        feats = {name: extract_dataset_features(encoder, ds, bs, device, transform,
                                                 args.workers, desc=f"features {name}")
                 for name, ds in (("train", train), ("val", val), ("test", test))}
        result = linear_probe(feats["train"], feats["val"], feats["test"], args.l2_grid,
                              args.probe_steps, class_names, return_scores=True)
    elif args.task == "finetune":
        result = finetune(encoder, train, val, test, settings, device, transform, out)
    else:
        result = segment(encoder, train, val, test, settings, device, transform, out)

    scores = result.pop("test_scores", None)
    model = result.pop("model", None)
    results = {
        "task": args.task, **result,
        "dataset": _dataset_info(args, splits, image_size),
        "encoder": loaded.describe(),
        "encoder_config": None if loaded.config is None else json.loads(loaded.config.to_json()),
        "args": {"task": args.task, **dataclasses.asdict(args)},
        "versions": {"spcl_fast": __version__, "torch": torch.__version__},
        "device": str(device),
        "elapsed_s": time.perf_counter() - started,
    }
    title = f"{args.task} | {args.checkpoint} | {args.dataset} (label fraction " \
            f"{args.label_fraction})"
    print(dice_table(result, title) if args.task == "segment" else auroc_table(result, title))
    if out is not None:
        write_results(out / "results.json", results)
        if scores is not None:
            plot_roc_curves(scores, torch.as_tensor(test.labels), class_names,
                            out / "roc_curves.png", f"{args.task}: {Path(args.checkpoint).name}")
        if model is not None:
            plot_segment_examples(model, test, transform, device, out / "segment_examples.png")
        print(f"wrote {out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except EvalError as exc:
        raise SystemExit(f"error: {exc}") from None
    except data_lib.ImageReadError as exc:
        # Evaluation never swaps a bad image for another: that would score the wrong labels.
        problem = one_line(exc)
        raise SystemExit(f"error: {problem}. Every listed image must be readable for an "
                         "evaluation; python -m spcl_fast.data.prepare builds a cache without "
                         "the unreadable files (listed in its report.json) for --cache") from None


if __name__ == "__main__":
    main()
