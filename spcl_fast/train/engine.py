"""The training loop: data stream, model, optimizer, schedule, logging, checkpoints, probe.

Read top to bottom like nanoGPT's loop; everything a resumed run needs is in the checkpoint
(model, optimizer, step, data position, partition generator and torch RNG states).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import build_dataset, normalize_images
from ..data import synthetic as synthetic_data
from ..methods import DINO, MAE, SPCL
from ..nn import create_vit
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig

METHOD_NAMES = {"spcl": "S-PCL", "mae": "MAE", "dino": "DINO"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The encoder and method of ``config``, initialised from ``config.seed``."""
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
        subset_jitter=config.subset_jitter,
        subset_warp=config.subset_warp,
        negatives=config.negatives,
        layout=config.layout,
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for norms, biases and position embeddings (1-D or pos_embed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("pos_embed") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (
        1 + math.cos(math.pi * min(progress, 1.0))
    )


class BatchStream:
    """Batches of images in a fresh random order each epoch (seeded by ``(seed, epoch)``): no
    image twice per epoch, the last incomplete batch dropped. Its position is part of the
    checkpoint, so a resumed run sees exactly the batches it would have seen.

    ``source`` is an in-memory ``(n, 1, S, S)`` tensor (the synthetic set) or a map-style
    dataset read through a ``DataLoader`` with ``num_workers`` processes (real datasets).
    """

    def __init__(self, source, batch_size: int, seed: int, num_workers: int = 0):
        if len(source) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(source)} images")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.num_workers = num_workers
        self.epoch, self.position = 0, 0
        self._loader = None

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.source), generator=g)

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.source):
            self.epoch, self.position, self._loader = self.epoch + 1, 0, None
        if isinstance(self.source, torch.Tensor):
            idx = self._order()[self.position : self.position + self.batch_size]
            batch = self.source[idx]
        else:
            if self._loader is None:  # (re)start the epoch at the saved position
                remaining = self._order()[self.position :].tolist()
                self._loader = iter(
                    torch.utils.data.DataLoader(
                        torch.utils.data.Subset(self.source, remaining),
                        batch_size=self.batch_size,
                        drop_last=True,
                        num_workers=self.num_workers,
                        persistent_workers=False,
                        pin_memory=torch.cuda.is_available(),
                    )
                )
            batch = next(self._loader)["image"]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._loader = None


def load_split(config: TrainConfig, split: str):
    """The dataset of a split: the synthetic set rendered into memory (``(n, 1, S, S)``
    tensor), a real one as a map-style dataset that skips unreadable files. Returns
    ``(images_or_dataset, labels (n, C), class_names)``."""
    if config.dataset == "synthetic":
        kwargs = {"seed": 0}
        if config.num_images is not None and split == "train":
            kwargs["num_images"] = config.num_images
        ds = build_dataset("synthetic", None, split, config.image_size, **kwargs)
        return ds.images(), ds.labels, tuple(ds.class_names)
    ds = build_dataset(
        config.dataset,
        config.data_root,
        split,
        config.image_size,
        cache=config.data_cache,
        on_error="skip",
    )
    if config.num_images is not None and split == "train":
        ds = torch.utils.data.Subset(ds, range(min(config.num_images, len(ds))))
        labels, names = ds.dataset.labels[: len(ds)], ds.dataset.class_names
        return ds, labels, tuple(names)
    return ds, ds.labels, tuple(ds.class_names)


def as_tensor(source, batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """All images of an in-memory tensor or a dataset, ``(n, 1, S, S)`` (for probing)."""
    if isinstance(source, torch.Tensor):
        return source
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    return torch.cat([batch["image"] for batch in loader])


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


def _plot_losses(records: list[dict], path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{method} pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= upto_step]


def probe_encoders(config: TrainConfig, model: SPCL, device: torch.device, stats) -> dict:
    """Linear-probe the trained encoder and the same encoder at initialisation."""
    from ..eval import extract_features, linear_probe

    transform = normalizer(config, stats)
    splits = {}
    for split in ("train", "val", "test"):
        source, labels, names = load_split(config, split)
        splits[split] = (as_tensor(source, num_workers=config.num_workers), labels, names)
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


def train(config: TrainConfig, out_dir: str | Path, resume: str | Path | None = None) -> dict:
    """Pre-train per ``config``, writing everything to ``out_dir``; returns a summary dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    (out_dir / "config.json").write_text(config.to_json())

    source, _, _ = load_split(config, "train")
    stream = BatchStream(source, config.batch_size, config.seed, config.num_workers)
    stats = intensity_stats(config, source)
    transform = normalizer(config, stats)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
    )
    partitions = torch.Generator().manual_seed(config.seed + 1)
    step = 0
    if resume is not None:
        state, path = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        partitions.set_state(state["partition_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        print(f"resumed from {path} at step {step}")

    metrics_path = out_dir / "metrics.jsonl"
    records = _read_metrics(metrics_path, step)
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plan = model.sample_plan(config.batch_size, torch.Generator().manual_seed(0), "cpu")
    gflops = model.train_flops(plan) / config.batch_size / 1e9
    params = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    print(
        f"{METHOD_NAMES[config.method]}: {params:.2f}M-parameter "
        f"encoder, {model.encoder.num_patches} tokens/image, {gflops:.3f} GFLOPs/image per "
        f"training step ({gflops / 2:.3f} GMACs), device {device}"
    )

    def checkpoint_state() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "data": stream.state_dict(),
            "partition_rng": partitions.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": dataclasses.asdict(config),
            "intensity_stats": list(stats),
        }

    model.train()
    bad_streak = skipped = 0
    window_start, window_images = time.perf_counter(), 0
    bar = tqdm(
        total=config.steps,
        initial=step,
        desc=METHOD_NAMES[config.method],
        unit="step",
        dynamic_ncols=True,
    )
    with open(metrics_path, "a") as log:
        while step < config.steps:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = transform(stream.next().to(device, non_blocking=True))
            plan = model.sample_plan(x.shape[0], partitions, "cpu").to(device)
            out = model(x, plan=plan)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf")
            )
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                bad_streak += 1
                skipped += 1
                if bad_streak >= config.max_bad_steps:
                    raise RuntimeError(
                        f"{bad_streak} non-finite steps in a row at step {step} (loss "
                        f"{loss.item()}); stopping without overwriting the checkpoints in {out_dir}"
                    )
                step += 1
                continue
            bad_streak = 0
            optimizer.step()
            if hasattr(model, "after_step"):  # e.g. DINO's EMA teacher update
                model.after_step(step)
            step += 1
            window_images += x.shape[0]
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    **{k: v.item() for k, v in out.items() if k != "loss"},  # method's stats
                    "images_per_s": window_images / elapsed,
                    "gflops_per_image": gflops,
                    "skipped_steps": skipped,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                records.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                window_start, window_images = time.perf_counter(), 0
            bar.update(1)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save_checkpoint(checkpoint_state(), out_dir, step)
    bar.close()
    ckpt = save_checkpoint(checkpoint_state(), out_dir, step)
    if records:
        _plot_losses(records, out_dir / "loss_curve.png", METHOD_NAMES[config.method])

    summary = {
        "steps": step,
        "skipped_steps": skipped,
        "checkpoint": str(ckpt),
        "final_loss": records[-1]["loss"] if records else None,
        "gflops_per_image": gflops,
        "intensity_stats": list(stats),
    }
    if config.probe:
        summary["probe"] = probe_encoders(config, model, device, stats)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
