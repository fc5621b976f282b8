"""One process's share of a training run: :class:`Trainer` holds the data stream, the model
(and its DDP/FSDP/compiled form), optimizer, gradient scaler, plan streams, step and skip
counters, and runs one optimizer step (:meth:`Trainer.train_step`). Everything a resumed run
needs is in :meth:`Trainer.state_dict` (model, optimizer, gradient scaler, step, data position,
partition streams, every process's RNG states, skip counters), so ``--resume`` continues bit
for bit on CPU.

On a GPU a step never waits for the device: the loss and gradient norm are checked with
``torch.isfinite`` on the device, a bad step is skipped inside the fused AdamW (the GradScaler
protocol), and the counters are read back only on log and save steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
import torch.nn.functional as F

from .._impl import resolve_impl
from ..methods import AfterStep, BatchLoss
from ..run.config import OptimConfig, TrainConfig
from ..run.data import intensity_stats, load_split, normalizer
from ..run.device import resolve_device
from ..run.model import architecture_mismatch, build_model
from ..run.precision import autocast, grad_scaler
from ..run.schedule import lr_at
from .distributed import (
    DistContext,
    load_optimizer_state,
    model_state,
    optimizer_state,
    wrap_model,
)
from .sharding import BatchStream, PlanSampler, plan_to


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


def peak_lrs(optim: OptimConfig) -> tuple[float, float]:
    """``(lr, min_lr)`` as used: scaled by ``batch_size / lr_base_batch`` (the global batch,
    all processes and accumulation steps) when ``lr_base_batch`` is set, else as given."""
    scale = optim.batch_size / optim.lr_base_batch if optim.lr_base_batch else 1.0
    return optim.lr * scale, optim.min_lr * scale


def step_lr(step: int, optim: OptimConfig) -> float:
    """The learning rate of optimizer step ``step``: warmup, then cosine to the minimum."""
    return lr_at(step, optim.steps, optim.warmup_steps, *peak_lrs(optim))



def _rng_state(device: torch.device) -> tuple:
    """The global RNG states a forward pass draws from (the CPU's, and the device's)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                   else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' tensors joined along dim 0, each padded with zeros (``False``) to the
    largest size in every later dim."""
    shape = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts), strict=True)]
    return torch.cat([F.pad(p, [w for size, most in zip(p.shape[1:][::-1], shape[::-1],
                                                        strict=True) for w in (0, most - size)])
                      for p in parts])


def _part(joined: torch.Tensor, part: torch.Tensor, offset: int) -> torch.Tensor:
    """The rows of ``joined`` (from :func:`_join`) that hold ``part``, its padding cut off."""
    return joined[(slice(offset, offset + part.shape[0]),
                   *(slice(0, size) for size in part.shape[1:]))]


class Trainer:
    """One process's share of a run: data stream, model (and its DDP/FSDP/compiled form),
    optimizer, gradient scaler, partition streams, step and skip counters.

    ``config`` is taken as valid (:func:`~spcl_fast.train.engine.train` checks it before it
    claims the run folder; elsewhere call ``config.check()`` first). ``source`` replaces the
    config's training set (e.g. a benchmark's random images); ``state`` is a checkpoint to
    continue from. Build one per process (``ctx`` from
    :func:`~spcl_fast.train.distributed.setup`).
    """

    def __init__(self, config: TrainConfig, ctx: DistContext | None = None, source=None,
                 state: dict | None = None):
        self.config = config
        optim, data = config.optim, config.data
        self.ctx = ctx = ctx or DistContext(resolve_device(config.run.device))
        self.device = ctx.device
        self.fsdp = optim.fsdp and ctx.world > 1
        # an explicit --impl triton that cannot run here: refused before any data is read
        resolve_impl(config.model.impl, torch.empty(0, device=self.device),
                     f"--impl {config.model.impl}")
        self.class_names = None  # the training set's classes (None: a given source)
        if source is None:
            source, _, self.class_names = load_split(config, "train")
        if state and "intensity_stats" in state:
            self.stats = tuple(state["intensity_stats"])
        else:
            if data.dataset != "synthetic" and ctx.is_main:
                print("measuring the intensity statistics of the training images", flush=True)
            self.stats = intensity_stats(data.dataset, source, data.num_workers)
        self.transform = normalizer(data.normalize, self.stats)
        self.stream = BatchStream(source, optim.batch_size, config.run.seed, data.num_workers,
                                  ctx.rank, ctx.world, optim.accum_steps, self.device,
                                  data.batch_grouping, data.group_grid)
        self.model = build_model(config, global_batch_loss=ctx.world > 1).to(self.device)
        # a method that uses patients' ids (S-PCL's same_patient) gets each batch's
        self.uses_groups = bool(getattr(self.model, "uses_groups", False))
        if self.uses_groups and self.stream.groups is None:
            raise ValueError(f"--method {config.method} as set uses patients' ids "
                             f"(--same-patient), and the {data.dataset} training set has none")
        if ctx.world > 1:  # own streams per rank for whatever draws from the global RNGs
            torch.manual_seed(config.run.seed + 100_003 * (ctx.rank + 1))
        if state is not None:  # before wrapping: DDP and FSDP take the weights from here
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError as exc:
                raise ValueError(architecture_mismatch(state.get("config", {}), config,
                                                       exc)) from exc
        self.net, self.ddp = wrap_model(self.model, optim, ctx)
        # Fused AdamW: one kernel per step, and it honours found_inf (see _optimizer_step).
        self.optimizer = torch.optim.AdamW(param_groups(self.model, optim.weight_decay),
                                           lr=peak_lrs(optim)[0], betas=optim.betas, fused=True)
        self.scaler = grad_scaler(optim.precision, self.device)
        self.plans = PlanSampler(config.run.seed, optim.plan_shards or ctx.world, ctx.rank,
                                 ctx.world)
        self.after_step = self.model.after_step if isinstance(self.model, AfterStep) else None
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
        cfg = self.config.optim
        lr = step_lr(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, groups = self.stream.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(zip(images.split(self.stream.micro),
                         groups.split(self.stream.micro) if self.uses_groups
                         else [None] * (images.shape[0] // self.stream.micro), strict=True))
        if len(micro) > 1 and isinstance(self.model, BatchLoss):
            sums = self._cached_backward(micro)
        else:
            sums = self._accumulated_backward(micro)
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
        if self.after_step is not None:  # DINO's EMA teacher (a skipped step leaves the
            self.after_step(self.step)  # student as it was, so the EMA stays sound)
        self.step += 1
        return {**means, "grad_norm": grad_norm.detach(), "lr": lr}

    def _inputs(self, x: torch.Tensor, groups: torch.Tensor | None
                ) -> tuple[torch.Tensor, object, dict]:
        """A micro-batch on the device, normalised, its plan and the keyword arguments of the
        model's forward besides the plan (the patients' ids for a method that uses them)."""
        x = self.transform(x.to(self.device, non_blocking=True))
        kwargs = {} if groups is None else {"groups": groups}
        return x, plan_to(self.plans.sample(self.model, x), self.device), kwargs

    def _accumulated_backward(self, micro: list[tuple]) -> dict:
        """Each micro-batch's loss (over its own images) backpropagated in turn, weighted
        ``1 / len(micro)``: exact for losses that are means of per-image terms. Returns the
        detached numbers averaged over micro-batches."""
        cfg = self.config.optim
        sums: dict[str, torch.Tensor] = {}
        for k, (x, groups) in enumerate(micro):
            x, plan, kwargs = self._inputs(x, groups)
            with self._grad_sync(k == len(micro) - 1):
                with autocast(cfg.precision, self.device):
                    out = self.net(x, plan=plan, **kwargs)
                loss = out["loss"].float() / len(micro)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for key, value in out.items():
                value = value.detach().float() / len(micro)
                sums[key] = sums[key] + value if key in sums else value
        return sums

    def _cached_backward(self, micro: list[tuple]) -> dict:
        """The gradient of a :class:`~spcl_fast.methods.base.BatchLoss` over all micro-batches
        at once (GradCache): every micro-batch embedded without a graph, the loss of the whole
        batch backpropagated to the embeddings, then each micro-batch embedded again with a
        graph (the RNG replayed: the same draws) and backpropagated with its share of that
        gradient. Returns the loss's detached numbers."""
        cfg = self.config.optim
        inputs, cached = [], []
        for x, groups in micro:
            x, plan, kwargs = self._inputs(x, groups)
            inputs.append((x, plan, kwargs, _rng_state(self.device)))
            with torch.no_grad(), autocast(cfg.precision, self.device):
                cached.append(self.net(x, plan=plan, embed_only=True, **kwargs))
        after = _rng_state(self.device)
        embedded = {name: _join([c[name] for c in cached]) for name in cached[0]}
        for value in embedded.values():
            value.requires_grad_(value.is_floating_point())
        with autocast(cfg.precision, self.device):
            out = self.model.batch_loss(embedded)
        loss = out["loss"].float()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        offset = 0
        for k, (x, plan, kwargs, state) in enumerate(inputs):
            _set_rng_state(state, self.device)
            with self._grad_sync(k == len(inputs) - 1):
                with autocast(cfg.precision, self.device):
                    again = self.net(x, plan=plan, embed_only=True, **kwargs)
                pairs = [(value, _part(embedded[name].grad, value, offset))
                         for name, value in again.items()
                         if value.requires_grad and embedded[name].grad is not None]
                torch.autograd.backward(*zip(*pairs, strict=True))
            offset += x.shape[0]
        _set_rng_state(after, self.device)
        return {key: value.detach().float() for key, value in out.items()}

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
            "lr": step_lr(self.step, self.config.optim),
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
