"""The training loop: logging, health checks, checkpoints, signals, the final probe.

Read top to bottom like nanoGPT's loop. :func:`train` claims the run folder (or picks the
checkpoint to resume), builds the :class:`~spcl_fast.train.trainer.Trainer` (one process's
share of the run: data, model, optimizer, one step at a time), then loops: log every
``log_every`` steps, checkpoint every ``save_every``, stop cleanly on SIGTERM/SIGINT, stop after
``max_bad_steps`` non-finite steps in a row, and at the end write the summary and probe the
encoder. What a run *is* (config, model, data, checkpoints) lives in :mod:`spcl_fast.run`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.errors import one_line
from ..eval import extract_features, linear_probe, paired_bootstrap, patient_probe
from ..methods import BatchLoss
from ..run.checkpoint import (
    PATTERN,
    checkpoint_path,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    save_atomic,
    save_checkpoint,
    write_text_atomic,
)
from ..run.config import TrainConfig
from ..run.data import load_split, materialize, normalizer
from ..run.model import build_model
from .distributed import DistContext, model_state, setup, teardown
from .interrupt import GracefulStop
from .monitor import MetricsLog, peak_tflops, plot_losses, throughput
from .trainer import Trainer, peak_lrs

__all__ = ["NonFiniteStop", "SaveError", "SetupError", "Trainer", "train"]


def probe_splits(config: TrainConfig) -> dict:
    """The probe's ``train``/``val``/``test`` splits, decoded once: ``{split: (images, labels,
    class_names)}``."""
    splits = {}
    for split in ("train", "val", "test"):
        source, labels, names = load_split(config, split)
        splits[split] = (*materialize(source, labels, num_workers=config.data.num_workers), names)
    return splits


def probe_features(config: TrainConfig, splits: dict, features,
                   return_scores: bool = False) -> dict:
    """:func:`linear_probe` on ``features(images)`` of every split (the class names of test)."""
    feats = {s: (features(imgs), labels) for s, (imgs, labels, _) in splits.items()}
    return linear_probe(feats["train"], feats["val"], feats["test"],
                        steps=config.run.probe_steps, class_names=splits["test"][2],
                        return_scores=return_scores)


def probe_encoders(config: TrainConfig, model: torch.nn.Module, device: torch.device,
                   stats, scores_path: Path | None = None) -> dict:
    """Linear-probe the trained encoder, the same encoder at initialisation and the normalised
    raw pixels (the baseline that needs no encoder), on the same splits, with a progress bar
    over the three.

    ``pretrained_minus`` holds the paired bootstrap (:func:`paired_bootstrap`, over the test
    images) of the pre-trained mean AUROC minus each baseline's: a gain whose interval holds 0
    is not one this test set can see. The test scores go to ``scores_path`` (``labels``,
    ``class_names`` and one ``(n, C)`` tensor per encoder), so studies can pool seeds."""
    transform = normalizer(config.data.normalize, stats)
    print("linear probe: reading the train/val/test splits", flush=True)
    splits = probe_splits(config)
    encoders = {"pretrained": model.encoder, "init": build_model(config).encoder,
                "raw_pixels": None}
    results = {}
    with tqdm(encoders.items(), desc="linear probe", unit="encoder", dynamic_ncols=True) as bar:
        for name, encoder in bar:
            bar.set_postfix_str(name)
            if encoder is not None:
                encoder.to(device)

            def features(x, e=encoder):
                if e is None:  # the raw pixels
                    return transform(x).flatten(1)
                return extract_features(e, x, device=device, transform=transform)

            results[name] = probe_features(config, splits, features, return_scores=True)
    scores = {name: res.pop("test_scores") for name, res in results.items()}
    labels = splits["test"][1]
    results["pretrained_minus"] = {name: paired_bootstrap(scores["pretrained"], scores[name],
                                                          labels, seed=config.run.seed)
                                   for name in ("init", "raw_pixels")}
    if scores_path is not None:
        save_atomic({"labels": labels, "class_names": list(splits["test"][2]), **scores},
                    scores_path)
    return results


def probe_skipped(config: TrainConfig, class_names) -> str | None:
    """Why the end-of-run probe cannot run on the training set (``class_names``: its classes),
    or ``None`` when it can."""
    if class_names is not None and not class_names:
        return (f"dataset {config.data.dataset!r} has no labels, so the end-of-run linear "
                "probe is skipped (probe the checkpoint on a labelled set with python -m "
                "spcl_fast.eval; --probe false silences this)")
    return None


class NonFiniteStop(RuntimeError):
    """``max_bad_steps`` non-finite steps in a row: the run stops, its checkpoints untouched."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (a full disk...); the earlier ones are intact."""


class SetupError(ValueError):
    """A run that cannot start: a bad setting, dataset, cache or checkpoint (the message names
    it; the CLI prints it as one line)."""


def _finite_or_none(value):
    """Strict JSON has no NaN: a non-finite number is recorded as null."""
    return value if value is not None and math.isfinite(value) else None


def _claim_out_dir(out_dir: Path, resume) -> None:
    """Create ``out_dir``; unless the run resumes from ``out_dir`` itself (its folder or one of
    its checkpoints), refuse a folder that holds a run already (its checkpoints would be pruned
    and its metrics overwritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = None if resume is None else Path(resume)
    if source is not None and source.is_file():
        source = source.parent
    if source is None or source.resolve() != out_dir.resolve():
        held = [p.name for p in (*list_checkpoints(out_dir)[-1:], out_dir / "metrics.jsonl")
                if p.exists()]
        if held:
            raise ValueError(f"{out_dir} already holds a run ({', '.join(held)}): --resume "
                             "continues it; choose another --out to start a new one")


def _claim_and_resume(resume, out_dir: Path, ctx: DistContext):
    """The main process claims ``out_dir`` and (with ``resume``) picks the checkpoint; every
    process then gets the checkpoint, or the main process's reason to refuse the run, so no
    process is left waiting for a peer that has stopped. Returns ``(state, path)``."""
    state, path, problem = None, None, None
    if ctx.is_main:
        try:
            _claim_out_dir(out_dir, resume)
            if resume is not None:
                state, path = _pick_checkpoint(resume, out_dir)
        except (ValueError, OSError) as exc:
            problem = one_line(exc)
    path, problem = ctx.broadcast((None if path is None else str(path), problem))
    if problem is not None:
        raise ValueError(problem)
    if path is not None and not ctx.is_main:
        state, _ = load_checkpoint(path)
    return state, None if path is None else Path(path)


def _pick_checkpoint(resume: str | Path, out_dir: Path) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint of ``resume`` (falling back past corrupt ones, which are
    set aside as ``*.corrupt``). A run folder without checkpoints yet (a run killed before its
    first save) means starting from step 0, so one command line starts or continues a run; a
    named checkpoint file must exist, and must not be older than a checkpoint in ``out_dir``
    (continuing it there would prune that run's later checkpoints)."""
    state, path = None, None
    named = Path(resume).is_file() or Path(resume).suffix == ".pt"
    try:
        state, path = load_checkpoint(resume)
    except FileNotFoundError:
        if named:
            raise
        print(f"no checkpoint in {resume} yet: starting from step 0")
    if path is not None and PATTERN.match(path.name):
        later = [p for p in list_checkpoints(out_dir)
                 if checkpoint_step(p) > checkpoint_step(path)]
        if later and named:
            raise ValueError(f"{path.name} is older than {later[-1].name} in {out_dir}: "
                             "continuing it there would replace that run's later steps; "
                             "resume it with another --out")
        for p in later:  # the same folder (_claim_out_dir): unreadable, or it would load
            p.rename(p.with_name(p.name + ".corrupt"))
            warnings.warn(f"set aside unreadable {p.name} as {p.name}.corrupt", stacklevel=2)
    return state, path


def _full_model(trainer: Trainer) -> torch.nn.Module | None:
    """The trained model, unsharded, on the main process (``None`` elsewhere)."""
    if not trainer.fsdp:
        return trainer.model if trainer.ctx.is_main else None
    state = model_state(trainer.model, fsdp=True)
    if not trainer.ctx.is_main:
        return None
    model = build_model(trainer.config)
    model.load_state_dict(state)
    return model


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device):
    """Deterministic algorithms for the run (``run.deterministic``), restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the patch-embedding convolution
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(config: TrainConfig, out_dir: str | Path, resume: str | Path | None = None) -> dict:
    """Pre-train per ``config``, writing everything to ``out_dir``; returns a summary dict.

    Under ``torchrun`` every process calls this (the main one writes the files). On SIGTERM or
    SIGINT the run finishes its step, checkpoints and returns with ``summary["interrupted"]``
    (the signal's name) and ``summary["exit_code"]`` (``128 + signal``)."""
    ctx = setup(config.run.device)
    threads = torch.get_num_threads()
    try:
        with _determinism(config.run.deterministic, ctx.device):
            summary = _train(config, Path(out_dir), resume, ctx)
    except BaseException:
        teardown(ctx)
        raise
    finally:
        torch.set_num_threads(threads)
    teardown(ctx, clean=True)
    return summary


def _start(config: TrainConfig, out_dir: Path, resume, ctx: DistContext) -> tuple[Trainer, float]:
    """The run's :class:`Trainer` (resumed where asked) and its training GFLOPs per image.
    Everything that can reject the run happens before anything is written to ``out_dir``."""
    created = not out_dir.exists()
    try:
        config.check()
        if config.run.threads:  # checked first: torch's own error for a bad count is a traceback
            torch.set_num_threads(config.run.threads)
        state, path = _claim_and_resume(resume, out_dir, ctx)
        trainer = Trainer(config, ctx, state=state)
        # Per image of the loss's batch (the negatives it sees: every process's images, of
        # the whole step where accumulation caches the embeddings, else of one micro-step).
        loss_batch = config.optim.batch_size // (
            1 if isinstance(trainer.model, BatchLoss) else config.optim.accum_steps)
        plan = trainer.model.sample_plan(loss_batch, torch.Generator().manual_seed(0), "cpu")
    except (ValueError, OSError, RuntimeError) as exc:
        if ctx.is_main and created:
            with contextlib.suppress(OSError):  # only if still empty: nothing else to undo
                out_dir.rmdir()
        raise SetupError(one_line(exc)) from exc
    if ctx.is_main:
        changed = _resumed_changes(state, config, out_dir, trainer.step)
        write_text_atomic(out_dir / "config.json", config.to_json())
        if path is not None:
            print(f"resumed from {path} at step {trainer.step}"
                  + (f" with changed settings: {'; '.join(changed)}" if changed else ""))
    return trainer, trainer.model.train_flops(plan) / plan.num_images / 1e9


def _resumed_changes(state: dict | None, config: TrainConfig, out_dir: Path,
                     step: int) -> list[str]:
    """The settings a resumed run changes against its checkpoint's (``--resume --lr ...``;
    the output folder aside). The run folder's ``config.json`` of before is kept as
    ``config-step<N>.json``, so the settings of every stretch of steps stay on record."""
    if not state or not state.get("config"):
        return []
    saved = TrainConfig.from_dict(state["config"], strict=False)
    changed = saved.replace(out=config.run.out).differences(config)
    before = out_dir / "config.json"
    if changed and before.exists():
        write_text_atomic(out_dir / f"config-step{step:08d}.json", before.read_text())
    return changed


def _train(config: TrainConfig, out_dir: Path, resume, ctx: DistContext) -> dict:
    trainer, gflops = _start(config, out_dir, resume, ctx)
    peak = peak_tflops(ctx.device, config.optim.precision, config.run.peak_tflops)
    skipped = probe_skipped(config, trainer.class_names) if config.run.probe else None
    if ctx.is_main:
        _describe(trainer, gflops, peak)
        if skipped:
            print(skipped, flush=True)
    log = MetricsLog(out_dir, trainer.step, config.run.tensorboard, ctx.is_main)
    clock = _Clock(trainer.train_seconds)
    try:
        stopped_by = _loop(trainer, out_dir, log, clock, gflops, peak)
    finally:
        log.close()
    if not stopped_by:
        trainer.train_seconds = clock.seconds()
        _save(trainer, out_dir)
    ctx.barrier()  # nobody leaves (and lets torchrun end the others) before the file is written
    if ctx.is_main and log.records:
        plot_losses(log.records, out_dir / "loss_curve.png", trainer.model.label)
    summary = {
        "steps": trainer.step,
        "skipped_steps": trainer.counters()["skipped_steps"],
        "checkpoint": str(checkpoint_path(out_dir, trainer.step)),
        "final_loss": _finite_or_none(log.records[-1]["loss"]) if log.records else None,
        "gflops_per_image": gflops,
        "train_seconds": trainer.train_seconds,  # all steps, across resumes
        "intensity_stats": list(trainer.stats),
    }
    if stopped_by:
        summary["interrupted"] = signal.Signals(stopped_by).name
        summary["exit_code"] = 128 + stopped_by
    elif skipped:
        summary["probe_skipped"] = skipped
    if ctx.is_main:  # written before the probe: a run that trained is on record
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    if not stopped_by and config.run.probe and not skipped:
        _probe(trainer, out_dir, summary)
    return summary


def _probe(trainer: Trainer, out_dir: Path, summary: dict) -> None:
    """The end-of-run probe into ``summary`` (and ``summary.json``), timed as
    ``probe_seconds``; a split it cannot use (an empty one...) skips it with one line."""
    full = _full_model(trainer)  # every process (FSDP gathers the shards)
    if not trainer.ctx.is_main:
        return
    started = time.perf_counter()
    try:
        if patient_probe.applies(trainer.config):  # by patient: pre-trained, init, raw pixels
            init = build_model(trainer.config).encoder.to(trainer.device)
            summary["patient_probe"] = patient_probe.probe_run(
                trainer.config, full.encoder, init, normalizer(trainer.config.data.normalize,
                                                               trainer.stats))
        else:
            summary["probe"] = probe_encoders(trainer.config, full, trainer.device,
                                              trainer.stats, out_dir / "probe_scores.pt")
    except ValueError as exc:
        summary["probe_skipped"] = f"the end-of-run probe could not run: {one_line(exc)}"
        print(summary["probe_skipped"], flush=True)
    summary["probe_seconds"] = time.perf_counter() - started
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))


@dataclass
class _Clock:
    """Training seconds (checkpoint writes excluded, earlier runs of a resumed one included)
    and the images/s window since the last log line."""

    before: float  # from the checkpoint of a resumed run
    start: float = field(default_factory=time.perf_counter)
    saving: float = 0.0
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start - self.saving

    def rate(self, batch_size: int) -> float:
        """Images/s of the window, which then starts anew."""
        rate = self.window_steps * batch_size / (time.perf_counter() - self.window_start)
        self.window_start, self.window_steps = time.perf_counter(), 0
        return rate

    def exclude(self, seconds: float) -> None:
        """Time spent writing a checkpoint: neither training time nor throughput."""
        self.saving += seconds
        self.window_start += seconds


def _loop(trainer: Trainer, out_dir: Path, log: MetricsLog, clock: _Clock, gflops: float,
          peak: float | None) -> int:
    """Steps until the end or a signal; returns the signal's number (0: ran to the end)."""
    config, ctx = trainer.config, trainer.ctx
    run, steps = config.run, config.optim.steps
    bar = tqdm(total=steps, initial=trainer.step, desc=trainer.model.label, unit="step",
               dynamic_ncols=True, disable=not ctx.is_main)
    try:
        with GracefulStop() as stop:
            while trainer.step < steps:
                out = trainer.train_step()
                step, clock.window_steps = trainer.step, clock.window_steps + 1
                bar.update(1)
                stopped_by = ctx.max_int(stop.signum or 0)  # every rank stops at the same step
                log_now = step % run.log_every == 0 or step == steps
                save_now = run.save_every and step % run.save_every == 0
                if log_now or save_now or stopped_by:
                    counters = _check_health(trainer, out, out_dir)
                if log_now:
                    record = _record(trainer, out, counters, clock.rate(config.optim.batch_size),
                                     gflops, peak)
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}",
                                    img_s=f"{record['images_per_s']:.0f}")
                if stopped_by:  # consistent even mid-streak: bad steps change no weights
                    trainer.train_seconds = clock.seconds()
                    _save(trainer, out_dir)
                    return stopped_by
                if save_now and step < steps:
                    _periodic_save(trainer, out_dir, counters, clock)
    finally:
        bar.close()
    return 0


def _check_health(trainer: Trainer, out: dict, out_dir: Path) -> dict:
    """The skip counters (the host sync of this step); stops a run that keeps going bad."""
    counters = trainer.counters()
    if counters["peak_streak"] >= trainer.config.optim.max_bad_steps:
        raise NonFiniteStop(
            f"{counters['peak_streak']} non-finite steps in a row by step {trainer.step} "
            f"(loss {float(out['loss'])}); stopping without overwriting the checkpoints in "
            f"{out_dir}"
        )
    return counters


def _periodic_save(trainer: Trainer, out_dir: Path, counters: dict, clock: _Clock) -> None:
    """A ``save_every`` checkpoint, unless the step ends non-finite steps in a row (the older
    checkpoints, taken after good steps, are kept instead)."""
    if counters["bad_streak"]:
        if trainer.ctx.is_main:
            warnings.warn(f"step {trainer.step}: {counters['bad_streak']} non-finite step(s) "
                          "in a row; skipping this checkpoint", stacklevel=1)
        return
    trainer.train_seconds = clock.seconds()
    saved = time.perf_counter()
    _save(trainer, out_dir)
    clock.exclude(time.perf_counter() - saved)


def _describe(trainer: Trainer, gflops: float, peak: float | None) -> None:
    config, model = trainer.config, trainer.model
    optim = config.optim
    params = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    lr, _ = peak_lrs(optim)
    print(
        f"{model.label}: {params:.2f}M-parameter "
        f"encoder, {model.encoder.num_patches} tokens/image, {gflops:.3f} GFLOPs/image per "
        f"training step ({gflops / 2:.3f} GMACs), device {trainer.device}"
    )
    print(
        f"batch {optim.batch_size} = {trainer.ctx.world} process(es) x {trainer.micro_batch} "
        f"images x {optim.accum_steps} micro-step(s); {optim.precision}"
        f"{', compiled' if optim.compile else ''}{', FSDP' if trainer.fsdp else ''}; "
        f"peak lr {lr:.3g}; peak {peak or 'unknown'} TFLOP/s per device"
    )
    print(f"using {torch.get_num_threads()} CPU thread(s) per process; change with --threads",
          flush=True)


def _record(trainer: Trainer, out: dict, counters: dict, images_per_s: float, gflops: float,
            peak: float | None) -> dict:
    """One line of ``metrics.jsonl`` (reading the step's device tensors: one sync)."""
    keys = [k for k in out if k != "lr"]
    values = dict(zip(keys, torch.stack([out[k] for k in keys]).tolist(), strict=True))
    record = {
        "step": trainer.step,
        "loss": values.pop("loss"),
        "lr": out["lr"],
        "grad_norm": values.pop("grad_norm"),
        **values,  # the method's numbers
        "images_per_s": images_per_s,  # all processes together
        "gflops_per_image": gflops,
        **throughput(images_per_s, gflops, trainer.ctx.world, peak),
        "skipped_steps": counters["skipped_steps"],
        "epoch": trainer.stream.epoch,
    }
    if trainer.scaler is not None:
        record["overflow_steps"] = counters["overflow_steps"]
        record["loss_scale"] = trainer.scaler.get_scale()
    return record


def _save(trainer: Trainer, out_dir: Path) -> None:
    state = trainer.state_dict()  # every process: gathers RNG states (and FSDP shards)
    if state is None:
        return
    try:
        save_checkpoint(state, out_dir, trainer.step, keep_last=trainer.config.run.keep_last)
    except OSError as exc:
        kept = list_checkpoints(out_dir)
        intact = f"{kept[-1].name} is intact" if kept else "no earlier checkpoint exists"
        raise SaveError(f"cannot write {checkpoint_path(out_dir, trainer.step)} "
                        f"({exc.strerror or exc}); {intact}: free space and --resume "
                        f"{out_dir}") from exc
