"""The training loop: data stream, model, optimizer, schedule, logging, checkpoints, probe.

Read top to bottom like nanoGPT's loop. :class:`Trainer` holds one process's share of a run and
runs an optimizer step (:meth:`Trainer.train_step`); :func:`train` drives it: logging, health
checks, checkpoints, signals, the final probe. Everything a resumed run needs is in the
checkpoint (model, optimizer, gradient scaler, step, data position, partition streams, every
process's RNG states, skip counters), so ``--resume`` continues bit for bit on CPU.

On a GPU a step never waits for the device: the loss and gradient norm are checked with
``torch.isfinite`` on the device, a bad step is skipped inside the fused AdamW (the GradScaler
protocol), and the counters are read back only on log and save steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import NORMALIZE_MODES, CXRPool, build_dataset, normalize_images
from ..data import synthetic as synthetic_data
from ..data.errors import one_line
from ..methods import DINO, MAE, SPCL
from ..nn import create_vit
from .checkpoint import (
    PATTERN,
    checkpoint_path,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from .config import TrainConfig
from .distributed import (
    DistContext,
    load_optimizer_state,
    model_state,
    optimizer_state,
    resolve_device,
    setup,
    teardown,
    wrap_model,
)
from .interrupt import GracefulStop
from .monitor import MetricsLog, peak_tflops, plot_losses, throughput
from .precision import autocast, check_precision, grad_scaler
from .sharding import BatchStream, PlanSampler, plan_to

METHOD_NAMES = {"spcl": "S-PCL", "mae": "MAE", "dino": "DINO"}
__all__ = ["Trainer", "build_model", "lr_at", "param_groups", "resolve_device", "train"]


def build_model(config: TrainConfig, global_batch_loss: bool = False) -> torch.nn.Module:
    """The encoder and method of ``config``, initialised from ``config.seed``.
    ``global_batch_loss``: S-PCL's InfoNCE over every process's embeddings (needs a process
    group)."""
    torch.manual_seed(config.seed)
    overrides = {
        k: v
        for k, v in (
            ("embed_dim", config.embed_dim),
            ("depth", config.depth),
            ("num_heads", config.num_heads),
        )
        if v is not None
    }
    encoder = create_vit(
        config.model,
        img_size=config.image_size,
        patch_size=config.patch_size,
        pos_embed=config.pos_embed,
        class_token=config.class_token,
        impl=config.impl,
        **overrides,
    )
    if config.method == "mae":
        return MAE(
            encoder,
            mask_ratio=config.mask_ratio,
            decoder_dim=config.decoder_dim,
            decoder_depth=config.decoder_depth,
            decoder_heads=config.decoder_heads,
            norm_pix_loss=config.norm_pix_loss,
        )
    if config.method == "dino":
        return DINO(
            encoder,
            num_local=config.dino_local_crops,
            global_size=config.dino_global_size,
            local_size=config.dino_local_size,
            out_dim=config.dino_out_dim,
            teacher_temp=config.teacher_temp,
            teacher_momentum=config.teacher_momentum,
            total_steps=config.steps,
        )
    if config.method != "spcl":
        raise ValueError(f"unknown method {config.method!r}; available: spcl, mae, dino")
    return SPCL(
        encoder,
        proj_hidden=config.proj_hidden,
        proj_dim=config.proj_dim,
        proj_depth=config.proj_depth,
        temperature=config.temperature,
        ratio=config.ratio,
        ratio_range=config.ratio_range,
        keep=config.keep,
        block_size=config.block_size,
        shared_split=config.shared_split,
        num_subsets=config.num_subsets,
        predictor_hidden=config.predictor_hidden,
        subset_jitter=config.subset_jitter,
        subset_warp=config.subset_warp,
        background_std=config.background_std,
        negatives=config.negatives,
        gather_distributed=global_batch_loss,
        layout=config.layout,
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for norms, biases, position embeddings and class tokens (1-D,
    pos_embed or cls_token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def peak_lrs(config: TrainConfig) -> tuple[float, float]:
    """``(lr, min_lr)`` as used: scaled by ``batch_size / lr_base_batch`` (the global batch,
    all processes and accumulation steps) when ``lr_base_batch`` is set, else as given."""
    scale = config.batch_size / config.lr_base_batch if config.lr_base_batch else 1.0
    return config.lr * scale, config.min_lr * scale


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak LR, then cosine decay to the minimum at ``steps``."""
    lr, min_lr = peak_lrs(config)
    if step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def _per_dataset(value: str | None, count: int, key: str) -> list[str | None]:
    """A pool's comma-separated ``data_root``/``data_cache``: one entry per dataset
    (``none`` or empty: no value for that one)."""
    if value is None or count == 1:
        return [value] * count
    parts = [None if p.strip().lower() in ("", "none") else p.strip() for p in value.split(",")]
    if len(parts) != count:
        raise ValueError(f"--{key.replace('_', '-')} names {len(parts)} folders for {count} "
                         f"pooled datasets (give one per dataset, comma-separated)")
    return parts


def load_split(config: TrainConfig, split: str):
    """The dataset of a split: the synthetic set rendered into memory (``(n, 1, S, S)``
    tensor), a real one (or a pool ``a+b`` of real ones, :class:`~spcl_fast.data.CXRPool`) as a
    map-style dataset that skips unreadable files. Returns ``(images_or_dataset, labels (n, C),
    class_names)``."""
    if config.dataset == "synthetic":
        kwargs = {"seed": 0}
        if config.num_images is not None and split == "train":
            kwargs["num_images"] = config.num_images
        ds = build_dataset("synthetic", None, split, config.image_size, **kwargs)
        return ds.images(), ds.labels, tuple(ds.class_names)
    names = config.dataset.split("+")
    roots = _per_dataset(config.data_root, len(names), "data_root")
    caches = _per_dataset(config.data_cache, len(names), "data_cache")
    members = [
        build_dataset(name, root, split, config.image_size, cache=cache, on_error="skip")
        for name, root, cache in zip(names, roots, caches, strict=True)
    ]
    ds = members[0] if len(members) == 1 else CXRPool(members, names=names)
    if config.num_images is not None and split == "train":
        ds = torch.utils.data.Subset(ds, range(min(config.num_images, len(ds))))
        labels, names = ds.dataset.labels[: len(ds)], ds.dataset.class_names
        return ds, labels, tuple(names)
    return ds, ds.labels, tuple(ds.class_names)


def as_tensor(source, batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """All images of an in-memory tensor or a dataset, ``(n, 1, S, S)``."""
    return source if isinstance(source, torch.Tensor) else materialize(
        source, None, batch_size, num_workers)[0]


def materialize(source, labels: torch.Tensor | None, batch_size: int = 256,
                num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and labels of a split as tensors (for probing). A dataset that skips an unreadable
    file returns the next item in its place: such stand-ins are left out (a probe must not count
    one image twice), with a warning."""
    if isinstance(source, torch.Tensor):
        return source, labels
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches]) if labels is not None else None
    expected = getattr(source, "ids", None)
    if expected is None and isinstance(source, torch.utils.data.Subset):  # --num-images
        ids = getattr(source.dataset, "ids", None)
        expected = None if ids is None else [ids[i] for i in source.indices]
    if expected is not None:
        got = [i for b in batches for i in b["id"]]
        own = torch.tensor([a == b for a, b in zip(got, expected, strict=True)])
        if not own.all():
            warnings.warn(f"{int((~own).sum())} unreadable images left out of the probe",
                          stacklevel=2)
            images, labels = images[own], None if labels is None else labels[own]
    return images, labels


def intensity_stats(config: TrainConfig, source) -> tuple[float, float]:
    """Dataset-wide pixel mean and std for ``normalize="dataset"``: fixed constants for the
    synthetic set, measured on the first 256 training images of a real one."""
    if config.dataset == "synthetic":
        return synthetic_data.MEAN, synthetic_data.STD
    n = min(256, len(source))
    sample = as_tensor(torch.utils.data.Subset(source, range(n)), num_workers=config.num_workers)
    return sample.mean().item(), sample.std().item()


def normalizer(config: TrainConfig, stats: tuple[float, float]):
    mean, std = stats
    return lambda x: normalize_images(x, config.normalize, mean, std)


def probe_encoders(config: TrainConfig, model: torch.nn.Module, device: torch.device,
                   stats) -> dict:
    """Linear-probe the trained encoder and the same encoder at initialisation."""
    from ..eval import extract_features, linear_probe

    transform = normalizer(config, stats)
    splits = {}
    for split in ("train", "val", "test"):
        source, labels, names = load_split(config, split)
        splits[split] = (*materialize(source, labels, num_workers=config.num_workers), names)
    results = {}
    for name, encoder in (("pretrained", model.encoder), ("init", build_model(config).encoder)):
        encoder = encoder.to(device)
        feats = {
            s: (extract_features(encoder, imgs, device=device, transform=transform), labels)
            for s, (imgs, labels, _) in splits.items()
        }
        results[name] = linear_probe(
            feats["train"],
            feats["val"],
            feats["test"],
            steps=config.probe_steps,
            class_names=splits["test"][2],
        )
    return results


class NonFiniteStop(RuntimeError):
    """``max_bad_steps`` non-finite steps in a row: the run stops, its checkpoints untouched."""


class SetupError(ValueError):
    """A run that cannot start: a bad setting, dataset, cache or checkpoint (the message names
    it; the CLI prints it as one line)."""


def _mismatch(saved: dict, config: TrainConfig, exc: Exception) -> str:
    """Why a checkpoint's weights do not load into this config's model, in one line."""
    differ = [f"{f.name} {saved[f.name]!r} (now {getattr(config, f.name)!r})"
              for f in dataclasses.fields(config)
              if f.name in saved and f.name != "extra" and saved[f.name] != getattr(config, f.name)
              and f.name in _ARCHITECTURE]
    if differ:
        return ("the checkpoint's model was built with other settings: " + "; ".join(differ)
                + ". Resume without changing them, or start a new run")
    return "the checkpoint's weights do not fit this model: " + str(exc).splitlines()[0]


# Config fields that shape the model's parameters (a resumed run must keep them).
_ARCHITECTURE = {"model", "image_size", "patch_size", "embed_dim", "depth", "num_heads",
                 "pos_embed", "class_token", "method", "proj_hidden", "proj_dim", "proj_depth",
                 "predictor_hidden", "decoder_dim", "decoder_depth", "decoder_heads",
                 "dino_out_dim"}


def _finite_or_none(value):
    """Strict JSON has no NaN: a non-finite number is recorded as null."""
    return value if value is not None and math.isfinite(value) else None


def check_config(config: TrainConfig) -> None:
    """Reject settings no run can use (the sharding classes check the batch arithmetic)."""
    check_precision(config.precision)
    if config.normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got "
                         f"{config.normalize!r}")
    if config.method not in METHOD_NAMES:
        raise ValueError(f"unknown method {config.method!r}; available: {', '.join(METHOD_NAMES)}")
    c = config
    rules = {  # name: (ok, what it must be)
        "steps": (c.steps >= 1, ">= 1"),
        "batch_size": (c.batch_size >= 1, ">= 1"),
        "image_size": (c.image_size >= 1, ">= 1"),
        "patch_size": (c.patch_size >= 1, ">= 1"),
        "embed_dim": (c.embed_dim is None or c.embed_dim >= 1, ">= 1"),
        "depth": (c.depth is None or c.depth >= 1, ">= 1"),
        "num_heads": (c.num_heads is None or c.num_heads >= 1, ">= 1"),
        "proj_hidden": (c.proj_hidden >= 1, ">= 1"),
        "proj_dim": (c.proj_dim >= 1, ">= 1"),
        "proj_depth": (c.proj_depth >= 0, ">= 0"),
        "predictor_hidden": (c.predictor_hidden >= 0, ">= 0 (0: none)"),
        "keep": (0 < c.keep <= 1, "in (0, 1]"),
        "ratio": (0 < c.ratio < 1, "in (0, 1)"),
        "ratio_range": (c.ratio_range is None or 0 < c.ratio_range[0] <= c.ratio_range[1] < 1,
                        "(lo, hi) with 0 < lo <= hi < 1"),
        "block_size": (c.block_size >= 1, ">= 1"),
        "num_subsets": (2 <= c.num_subsets <= max(1, c.image_size // max(c.patch_size, 1)) ** 2,
                        "from 2 to the number of patches"),
        "temperature": (math.isfinite(c.temperature) and c.temperature > 0, "positive"),
        "negatives": (c.negatives in ("cross", "all"), "cross or all"),
        "layout": (c.layout in ("packed", "inplace"), "packed or inplace"),
        "impl": (c.impl in ("auto", "triton", "torch"), "auto, triton or torch"),
        "lr": (math.isfinite(c.lr) and c.lr > 0, "positive and finite"),
        "min_lr": (math.isfinite(c.min_lr) and c.min_lr >= 0, ">= 0 and finite"),
        "warmup_steps": (c.warmup_steps >= 0, ">= 0"),
        "weight_decay": (math.isfinite(c.weight_decay) and c.weight_decay >= 0, ">= 0"),
        "grad_clip": (c.grad_clip >= 0, ">= 0 (0: off)"),
        "num_workers": (c.num_workers >= 0, ">= 0"),
        "save_every": (c.save_every >= 0, ">= 0 (0: only at the end)"),
        "max_bad_steps": (c.max_bad_steps >= 1, ">= 1"),
        "accum_steps": (c.accum_steps >= 1, ">= 1"),
        "keep_last": (c.keep_last >= 1, ">= 1"),
        "log_every": (c.log_every >= 1, ">= 1"),
        "lr_base_batch": (c.lr_base_batch >= 0, ">= 0"),
        "plan_shards": (c.plan_shards >= 0, ">= 0"),
    }
    for name, (ok, want) in rules.items():
        if not ok:
            raise ValueError(f"{name} must be {want}, got {getattr(config, name)!r}")


class Trainer:
    """One process's share of a run: data stream, model (and its DDP/FSDP/compiled form),
    optimizer, gradient scaler, partition streams, step and skip counters.

    ``source`` replaces the config's training set (e.g. a benchmark's random images); ``state``
    is a checkpoint to continue from. Build one per process (``ctx`` from
    :func:`~spcl_fast.train.distributed.setup`).
    """

    def __init__(self, config: TrainConfig, ctx: DistContext | None = None, source=None,
                 state: dict | None = None):
        check_config(config)
        self.config = config
        self.ctx = ctx = ctx or DistContext(resolve_device(config.device))
        self.device = ctx.device
        self.fsdp = config.fsdp and ctx.world > 1
        if source is None:
            source = load_split(config, "train")[0]
        self.stats = (tuple(state["intensity_stats"]) if state and "intensity_stats" in state
                      else intensity_stats(config, source))
        self.transform = normalizer(config, self.stats)
        self.stream = BatchStream(source, config.batch_size, config.seed, config.num_workers,
                                  ctx.rank, ctx.world, config.accum_steps, self.device)
        global_loss = ctx.world > 1 and config.method == "spcl"
        self.model = build_model(config, global_batch_loss=global_loss).to(self.device)
        if ctx.world > 1:  # own streams per rank for whatever draws from the global RNGs
            torch.manual_seed(config.seed + 100_003 * (ctx.rank + 1))
        if state is not None:  # before wrapping: DDP and FSDP take the weights from here
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError as exc:
                raise ValueError(_mismatch(state.get("config", {}), config, exc)) from exc
        self.net, self.ddp = wrap_model(self.model, config, ctx)
        lr, _ = peak_lrs(config)
        # Fused AdamW: one kernel per step, and it honours found_inf (see _optimizer_step).
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=lr,
                                           betas=config.betas, fused=True)
        self.scaler = grad_scaler(config.precision, self.device)
        self.plans = PlanSampler(config.seed, config.plan_shards or ctx.world, ctx.rank,
                                 ctx.world)
        self.step = 0
        self.train_seconds = 0.0  # wall seconds of training steps, summed over resumed runs
        # Device-side counters: read back only on log/save steps (no per-step host sync).
        self._count = {k: torch.zeros((), dtype=torch.int64, device=self.device)
                       for k in ("skipped_steps", "overflow_steps", "bad_streak", "peak_streak")}
        if state is not None:
            self._load(state)

    @property
    def micro_batch(self) -> int:
        """Images per forward pass of one process."""
        return self.stream.micro

    @contextlib.contextmanager
    def _grad_sync(self, sync: bool):
        """Accumulation: reduce gradients over processes only on the last micro-step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
        if self.ddp is not None and not sync:
            with self.ddp.no_sync():
                yield
        else:
            yield

    def train_step(self) -> dict:
        """One optimizer step over ``accum_steps`` micro-batches. Returns the step's ``lr``
        (float) and, as detached device tensors, ``loss`` and the method's numbers (means
        over micro-steps and processes) and ``grad_norm`` (before clipping)."""
        cfg = self.config
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = self.stream.next()
        self.optimizer.zero_grad(set_to_none=True)
        micro = images.split(self.stream.micro)
        sums: dict[str, torch.Tensor] = {}
        for k, x in enumerate(micro):
            x = self.transform(x.to(self.device, non_blocking=True))
            plan = plan_to(self.plans.sample(self.model, x), self.device)
            with self._grad_sync(k == len(micro) - 1):
                with autocast(cfg.precision, self.device):
                    out = self.net(x, plan=plan)
                loss = out["loss"].float() / len(micro)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for key, value in out.items():
                value = value.detach().float() / len(micro)
                sums[key] = sums[key] + value if key in sums else value
        means = dict(zip(sums, self.ctx.mean_(torch.stack(list(sums.values()))), strict=True))

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        finite_loss, finite_grad = torch.isfinite(means["loss"]), torch.isfinite(grad_norm)
        # fp16: non-finite gradients with a finite loss are a loss-scale overflow, which the
        # scaler handles (skip, lower the scale); only a non-finite loss is a bad step.
        bad = ~finite_loss if self.scaler is not None else ~(finite_loss & finite_grad)
        skip = bad | ~finite_grad
        self._optimizer_step(skip)
        if self.scaler is not None:
            self.scaler.update()
        c = self._count
        c["skipped_steps"] += bad
        c["overflow_steps"] += skip & ~bad
        c["bad_streak"] = torch.where(bad, c["bad_streak"] + 1, 0)
        c["peak_streak"] = torch.maximum(c["peak_streak"], c["bad_streak"])
        if hasattr(self.model, "after_step"):  # DINO's EMA teacher (a skipped step leaves the
            self.model.after_step(self.step)  # student as it was, so the EMA stays sound)
        self.step += 1
        return {**means, "grad_norm": grad_norm.detach(), "lr": lr}

    def _optimizer_step(self, skip: torch.Tensor) -> None:
        if self.optimizer.param_groups[0].get("fused"):
            # GradScaler's protocol for fused optimizers: with found_inf != 0 the kernel leaves
            # weights, moments and step counts untouched, on the device, without a host sync.
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skip.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif not skip.item():  # an optimizer restored as non-fused from an old checkpoint
            self.optimizer.step()

    def counters(self) -> dict[str, int]:
        """Host copies of the skip counters (a device sync). ``peak_streak`` is the longest
        run of bad steps since the previous call."""
        values = torch.stack(list(self._count.values())).tolist()
        self._count["peak_streak"] = self._count["bad_streak"].clone()
        return dict(zip(self._count, values, strict=True))

    def state_dict(self) -> dict | None:
        """The checkpoint: on the main process the full dict, elsewhere ``None``. Every process
        must call it (it gathers RNG states, and FSDP's shards)."""
        counters = self.counters()
        counters.pop("peak_streak")
        model = model_state(self.model, self.fsdp)
        optim = optimizer_state(self.model, self.optimizer, self.fsdp)
        cuda = self.device.type == "cuda"
        rng = self.ctx.gather({"cpu": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state(self.device) if cuda else None})
        plans = [s for states in self.ctx.gather(self.plans.state()) for s in states]
        if not self.ctx.is_main:
            return None
        return {
            "model": model,
            "optimizer": optim,
            "optimizer_format": "fsdp-full" if self.fsdp else "plain",
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "train_seconds": self.train_seconds,
            "lr": lr_at(self.step, self.config),
            "data": self.stream.state_dict(),
            "partition_rng": plans,
            "rng": rng,
            "counters": counters,
            "world_size": self.ctx.world,
            "config": dataclasses.asdict(self.config),
            "intensity_stats": list(self.stats),
        }

    def _load(self, state: dict) -> None:
        fmt = state.get("optimizer_format", "plain")
        if fmt != ("fsdp-full" if self.fsdp else "plain"):
            raise ValueError(f"the checkpoint's optimizer state is {fmt!r}: resume with "
                             f"--fsdp {'false' if self.fsdp else 'true'}, as it was trained")
        load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.fsdp)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        plans = state["partition_rng"]
        plans = [plans] if isinstance(plans, torch.Tensor) else plans  # single-stream format
        if not self.plans.load(plans):
            warnings.warn(f"the checkpoint has {len(plans)} partition streams, this run "
                          f"{self.plans.num_shards}: the extra ones start fresh", stacklevel=2)
        rng = state.get("rng") or [{"cpu": state["torch_rng"], "cuda": None}]
        if len(rng) == self.ctx.world:
            torch.set_rng_state(rng[self.ctx.rank]["cpu"])
            if rng[self.ctx.rank]["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng[self.ctx.rank]["cuda"], self.device)
        else:
            warnings.warn(f"the checkpoint comes from {len(rng)} processes, this run has "
                          f"{self.ctx.world}: per-process RNG streams start fresh", stacklevel=2)
        for key, value in state.get("counters", {}).items():
            self._count[key].fill_(int(value))
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))


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
    """Deterministic algorithms for the run (``config.deterministic``), restored afterwards."""
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
    ctx = setup(config.device)
    threads = torch.get_num_threads()
    try:
        with _determinism(config.deterministic, ctx.device):
            summary = _train(config, Path(out_dir), resume, ctx)
    except BaseException:
        teardown(ctx)
        raise
    finally:
        torch.set_num_threads(threads)
    teardown(ctx, clean=True)
    return summary


def _train(config: TrainConfig, out_dir: Path, resume, ctx: DistContext) -> dict:
    main = ctx.is_main
    if config.threads:
        torch.set_num_threads(config.threads)
    # Everything that can reject the run happens before anything is written to out_dir.
    created = not out_dir.exists()
    try:
        check_config(config)
        state, path = _claim_and_resume(resume, out_dir, ctx)
        trainer = Trainer(config, ctx, state=state)
        model = trainer.model
        plan = model.sample_plan(config.batch_size // config.accum_steps,
                                 torch.Generator().manual_seed(0), "cpu")
    except (ValueError, OSError, RuntimeError) as exc:
        if main and created:
            with contextlib.suppress(OSError):  # only if still empty: nothing else to undo
                out_dir.rmdir()
        raise SetupError(one_line(exc)) from exc
    del state
    if main:
        write_text_atomic(out_dir / "config.json", config.to_json())
        if path is not None:
            print(f"resumed from {path} at step {trainer.step}")
    # Per image of the loss's batch (every process's micro-batch: the negatives it sees).
    gflops = model.train_flops(plan) / plan.num_images / 1e9
    peak = peak_tflops(ctx.device, config.precision, config.peak_tflops)
    method = METHOD_NAMES[config.method]
    if main:
        _describe(trainer, gflops, peak)

    log = MetricsLog(out_dir, trainer.step, config.tensorboard, main)
    bar = tqdm(total=config.steps, initial=trainer.step, desc=method, unit="step",
               dynamic_ncols=True, disable=not main)
    stopped_by = 0
    window_start, window_steps = time.perf_counter(), 0  # images/s since the last log line
    loop_start, saving = window_start, 0.0  # training seconds exclude checkpoint writes
    seconds_before = trainer.train_seconds  # from the checkpoint of a resumed run

    def training_seconds() -> float:
        return seconds_before + time.perf_counter() - loop_start - saving
    try:
        with GracefulStop() as stop:
            while trainer.step < config.steps:
                out = trainer.train_step()
                step, window_steps = trainer.step, window_steps + 1
                bar.update(1)
                stopped_by = ctx.max_int(stop.signum or 0)  # every rank stops at the same step
                log_now = step % config.log_every == 0 or step == config.steps
                save_now = config.save_every and step % config.save_every == 0
                if log_now or save_now or stopped_by:
                    counters = trainer.counters()  # the host sync of this step
                    if counters["peak_streak"] >= config.max_bad_steps:
                        raise NonFiniteStop(
                            f"{counters['peak_streak']} non-finite steps in a row by step {step} "
                            f"(loss {float(out['loss'])}); stopping without overwriting the "
                            f"checkpoints in {out_dir}"
                        )
                if log_now:
                    rate = window_steps * config.batch_size / (time.perf_counter() - window_start)
                    record = _record(trainer, out, counters, rate, gflops, peak)
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{rate:.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if stopped_by:  # consistent even mid-streak: bad steps change no weights
                    trainer.train_seconds = training_seconds()
                    _save(trainer, out_dir)
                    break
                if save_now and step < config.steps:
                    if counters["bad_streak"]:  # keep the older ones, taken after good steps
                        if main:
                            warnings.warn(f"step {step}: {counters['bad_streak']} non-finite "
                                          "step(s) in a row; skipping this checkpoint",
                                          stacklevel=1)
                        continue
                    trainer.train_seconds = training_seconds()
                    saved = time.perf_counter()
                    _save(trainer, out_dir)
                    window_start += time.perf_counter() - saved  # not training throughput
                    saving += time.perf_counter() - saved
    finally:
        bar.close()
        log.close()
    if not stopped_by:
        trainer.train_seconds = training_seconds()
        _save(trainer, out_dir)
    ctx.barrier()  # nobody leaves (and lets torchrun end the others) before the file is written
    if main and log.records:
        plot_losses(log.records, out_dir / "loss_curve.png", method)

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
    elif config.probe:
        full = _full_model(trainer)
        if main:
            summary["probe"] = probe_encoders(config, full, ctx.device, trainer.stats)
    if main:
        write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _describe(trainer: Trainer, gflops: float, peak: float | None) -> None:
    config, model = trainer.config, trainer.model
    params = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    lr, _ = peak_lrs(config)
    print(
        f"{METHOD_NAMES[config.method]}: {params:.2f}M-parameter "
        f"encoder, {model.encoder.num_patches} tokens/image, {gflops:.3f} GFLOPs/image per "
        f"training step ({gflops / 2:.3f} GMACs), device {trainer.device}"
    )
    print(
        f"batch {config.batch_size} = {trainer.ctx.world} process(es) x {trainer.micro_batch} "
        f"images x {config.accum_steps} micro-step(s); {config.precision}"
        f"{', compiled' if config.compile else ''}{', FSDP' if trainer.fsdp else ''}; "
        f"peak lr {lr:.3g}; peak {peak or 'unknown'} TFLOP/s per device"
    )


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
    if state is not None:
        save_checkpoint(state, out_dir, trainer.step, keep_last=trainer.config.keep_last)
