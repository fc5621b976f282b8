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
from ..methods import SPCL
from ..nn import create_vit
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def build_model(config: TrainConfig) -> SPCL:
    """The encoder and method of ``config``, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    overrides = {
        k: v
        for k, v in (("embed_dim", config.embed_dim), ("depth", config.depth),
                     ("num_heads", config.num_heads))
        if v is not None
    }
    encoder = create_vit(
        config.model, img_size=config.image_size, patch_size=config.patch_size,
        pos_embed=config.pos_embed, impl=config.impl, **overrides,
    )
    if config.method != "spcl":
        raise ValueError(f"unknown method {config.method!r}; available: spcl")
    return SPCL(
        encoder, proj_hidden=config.proj_hidden, proj_dim=config.proj_dim,
        proj_depth=config.proj_depth, temperature=config.temperature, ratio=config.ratio,
        ratio_range=config.ratio_range, keep=config.keep, block_size=config.block_size,
        shared_split=config.shared_split,
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
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class BatchStream:
    """Batches in a fresh random order each epoch (seeded by ``(seed, epoch)``), no image twice
    per epoch, the last incomplete batch dropped; its position is part of the checkpoint."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int):
        if images.shape[0] < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} images")
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.images.shape[0], generator=g)

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.images.shape[0]:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.images[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def load_images(config: TrainConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """All images of a split in memory, ``(n, 1, S, S)`` in [0, 1], with labels and class names."""
    kwargs = {"seed": 0}
    if config.num_images is not None and split == "train":
        kwargs["num_images"] = config.num_images
    ds = build_dataset(config.dataset, config.data_root, split, config.image_size, **kwargs)
    return ds.images(), ds.labels, tuple(ds.class_names)


def normalizer(config: TrainConfig):
    mean, std = synthetic_data.MEAN, synthetic_data.STD
    return lambda x: normalize_images(x, config.normalize, mean, std)


def _plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("S-PCL pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= upto_step]


def probe_encoders(config: TrainConfig, model: SPCL, device: torch.device) -> dict:
    """Linear-probe the trained encoder and the same encoder at initialisation."""
    from ..eval import extract_features, linear_probe

    transform = normalizer(config)
    splits = {s: load_images(config, s) for s in ("train", "val", "test")}
    results = {}
    for name, encoder in (("pretrained", model.encoder), ("init", build_model(config).encoder)):
        encoder = encoder.to(device)
        feats = {
            s: (extract_features(encoder, imgs, device=device, transform=transform), labels)
            for s, (imgs, labels, _) in splits.items()
        }
        results[name] = linear_probe(feats["train"], feats["val"], feats["test"],
                                     steps=config.probe_steps, class_names=splits["test"][2])
    return results


def train(config: TrainConfig, out_dir: str | Path, resume: str | Path | None = None) -> dict:
    """Pre-train per ``config``, writing everything to ``out_dir``; returns a summary dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    (out_dir / "config.json").write_text(config.to_json())

    images, _, _ = load_images(config, "train")
    stream = BatchStream(images, config.batch_size, config.seed)
    transform = normalizer(config)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=config.betas)
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
    print(f"S-PCL: {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M-parameter "
          f"encoder, {model.encoder.num_patches} tokens/image, {gflops:.3f} GFLOPs/image per "
          f"training step ({gflops / 2:.3f} GMACs), device {device}")

    def checkpoint_state() -> dict:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "data": stream.state_dict(), "partition_rng": partitions.get_state(),
            "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(config),
        }

    model.train()
    bad_streak = skipped = 0
    window_start, window_images = time.perf_counter(), 0
    bar = tqdm(total=config.steps, initial=step, desc="S-PCL", unit="step", dynamic_ncols=True)
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
            step += 1
            window_images += x.shape[0]
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                    "acc": out["acc"].item(), "pos_sim": out["pos_sim"].item(),
                    "neg_sim": out["neg_sim"].item(), "images_per_s": window_images / elapsed,
                    "gflops_per_image": gflops, "skipped_steps": skipped,
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
        _plot_losses(records, out_dir / "loss_curve.png")

    summary = {"steps": step, "skipped_steps": skipped, "checkpoint": str(ckpt),
               "final_loss": records[-1]["loss"] if records else None,
               "gflops_per_image": gflops}
    if config.probe:
        summary["probe"] = probe_encoders(config, model, device)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
