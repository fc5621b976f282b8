"""Full fine-tuning for multi-label classification, as MAE / BEiT fine-tune a ViT.

AdamW with layer-wise learning-rate decay (block ``i`` of ``L`` gets ``lr * decay**(L + 1 - i)``;
the patch and position embeddings ``decay**(L + 1)``, the final norm and the head the full lr),
linear warmup then cosine decay per step, stochastic depth, no weight decay on norms, biases and
position embeddings, bf16 autocast on GPUs that have it (fp16 with a gradient scaler otherwise),
a binary cross-entropy that skips unknown (NaN) labels. The model is scored on val after every
epoch; the best one by val mean AUROC is kept (and written to ``finetune_best.pt``) and scored
on test.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import tyro
from torch import nn
from tqdm.auto import tqdm

from ..run.checkpoint import save_atomic
from ..run.precision import PRECISIONS, autocast, resolve_precision
from ..run.schedule import lr_at
from .encoders import set_drop_path
from .linear_probe import data_loader
from .metrics import multilabel_auroc


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known (non-NaN) entries of ``(B, C)`` targets; 0 (with
    a gradient path) when none is known.

    Example::

        >>> masked_bce(torch.zeros(2, 2), torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
        tensor(0.6931)
    """
    known = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(targets.float()), reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp(min=1)


class Classifier(nn.Module):
    """Encoder + linear head on its pooled features: ``(B, 1, S, S) -> (B, C)`` logits."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init: start near zero
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def layer_id(name: str, depth: int) -> int:
    """Layer of an encoder parameter for layer-wise decay: 0 for embeddings, ``i + 1`` for
    block ``i``, ``depth + 1`` for the final norm (and anything outside the encoder)."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, encoder: nn.Module, weight_decay: float,
                     layer_decay: float) -> list[dict]:
    """AdamW groups with an ``lr_scale`` per layer (see :func:`layer_id`) and no decay for 1-D
    parameters, position embeddings and class tokens. Parameters outside ``encoder`` (heads,
    decoders) get scale 1.

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> clf = Classifier(vit_tiny_patch16(img_size=32, patch_size=8, depth=2), 3)
        >>> groups = param_groups_lrd(clf, clf.encoder, 0.05, 0.5)
        >>> sorted({g["lr_scale"] for g in groups})
        [0.125, 0.25, 0.5, 1.0]
    """
    depth = len(encoder.blocks)
    enc_names = {id(p): n for n, p in encoder.named_parameters()}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        enc_name = enc_names.get(id(p))
        layer = layer_id(enc_name, depth) if enc_name is not None else depth + 1
        no_decay = p.ndim < 2 or name.endswith(("pos_embed", "cls_token"))
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - layer)}
        groups[key]["params"].append(p)
    return list(groups.values())


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device, transform=None,
            precision: str = "fp32", num_workers: int = 0,
            desc: str = "predict") -> torch.Tensor:
    """Logits ``(n, C)`` (fp32, CPU) of ``model`` on every item of ``dataset``."""
    was_training = model.training
    model.eval()
    out = []
    loader = data_loader(dataset, batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        x = batch["image"].to(device, non_blocking=True)
        x = transform(x) if transform is not None else x
        with autocast(precision, device):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out)


@dataclass
class FinetuneSettings:
    """How ``finetune`` trains: one ``--flag`` of ``python -m spcl_fast.eval finetune`` per
    field (but ``batch_size`` and ``num_workers``: the command's ``--batch-size``/``--workers``).
    :meth:`check` (which ``finetune`` calls) rejects values no run can use."""

    epochs: int = 10  # passes over the training split
    batch_size: Annotated[int, tyro.conf.Suppress] = 64  # images per step
    lr: float = 5e-4  # peak learning rate of the last layer (after warmup)
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    layer_decay: float = 0.75  # per-block learning-rate decay towards the input
    weight_decay: float = 0.05  # AdamW decay (not on norms, biases, position embeddings)
    warmup_epochs: float = 1.0  # linear warmup length
    drop_path: float = 0.1  # stochastic depth of the last block (linear in depth)
    grad_clip: float = 1.0  # clip the global gradient norm (0: off)
    precision: str = "auto"  # auto (bf16/fp16 on a GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0  # head init, data order, drop-path draws
    num_workers: Annotated[int, tyro.conf.Suppress] = 0  # DataLoader workers

    def check(self) -> None:
        check_fit_settings(self)


PRECISION_MODES = ("auto", *PRECISIONS)


def check_fit_settings(settings) -> None:
    """Reject values no supervised run can use, naming the setting (fine-tuning and
    segmentation share these fields)."""
    rules = {
        "epochs": (settings.epochs >= 1, ">= 1"),
        "batch_size": (settings.batch_size >= 1, ">= 1"),
        "lr": (settings.lr > 0, "> 0"),
        "min_lr": (settings.min_lr >= 0, ">= 0"),
        "layer_decay": (0 < settings.layer_decay <= 1, "in (0, 1]"),
        "weight_decay": (settings.weight_decay >= 0, ">= 0"),
        "warmup_epochs": (settings.warmup_epochs >= 0, ">= 0"),
        "drop_path": (0 <= settings.drop_path < 1, "in [0, 1)"),
        "num_workers": (settings.num_workers >= 0, ">= 0"),
        "precision": (settings.precision in PRECISION_MODES,
                      f"one of {', '.join(PRECISION_MODES)}"),
    }
    if hasattr(settings, "grad_clip"):
        rules["grad_clip"] = (settings.grad_clip >= 0, ">= 0 (0: off)")
    for name, (ok, want) in rules.items():
        if not ok:
            raise ValueError(f"{name} must be {want}, got {getattr(settings, name)!r}")


def fit_keep_best(model: nn.Module, optimizer: torch.optim.Optimizer, loader, loss_of,
                  validate, *, epochs: int, lr: float, min_lr: float, warmup_epochs: float,
                  grad_clip: float, device: torch.device, precision: str,
                  transform=None, desc: str = "train", best_path: Path | None = None,
                  best_extra: dict | None = None) -> dict:
    """The supervised loop that fine-tuning and segmentation share: per step the warmup +
    cosine learning rate (times each group's ``lr_scale``), autocast, a gradient scaler (active
    for fp16), optional clipping; after each epoch ``validate(model) -> (score, record, message)``
    where a higher score is better and NaN never wins. The best epoch's weights are loaded back
    into ``model`` (and written atomically to ``best_path`` with ``best_extra``).

    Returns ``best_epoch``, ``best_score``, ``best_record``, ``history`` (per epoch: mean train
    loss and the record) and ``steps``."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    total, warmup = epochs * len(loader), round(warmup_epochs * len(loader))
    best, history, step = None, [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        bar = tqdm(loader, desc=f"{desc} {epoch}/{epochs}", unit="step", leave=False,
                   dynamic_ncols=True)
        for batch in bar:
            step_lr = lr_at(step, total, warmup, lr, min_lr)
            for g in optimizer.param_groups:
                g["lr"] = step_lr * g["lr_scale"]
            x = batch["image"].to(device, non_blocking=True)
            x = transform(x) if transform is not None else x
            with autocast(precision, device):
                output = model(x)
            loss = loss_of(output, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            step += 1
        train_loss = sum(losses) / max(len(losses), 1)
        score, record, message = validate(model)
        history.append({"epoch": epoch, "train_loss": train_loss, **record})
        print(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f}, {message}")
        if best is None or (not math.isnan(score) and (math.isnan(best[0]) or score > best[0])):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = (score, epoch, state, record)
            if best_path is not None:
                save_atomic({"model": state, "epoch": epoch, **record, **(best_extra or {})},
                             best_path)
    score, epoch, state, record = best
    model.load_state_dict(state)
    return {"best_epoch": epoch, "best_score": score, "best_record": record,
            "history": history, "steps": step}


def finetune(encoder: nn.Module, train, val, test, settings: FinetuneSettings,
             device: torch.device, transform=None, out_dir: str | Path | None = None) -> dict:
    """Fine-tune ``encoder`` + a linear head on ``train``; keep the best epoch by val mean AUROC;
    score it on ``test``.

    ``train``/``val``/``test`` follow the data contract (items ``{"image", "labels", ...}``,
    attributes ``labels``, ``class_names``). Returns ``mean_auroc`` and ``per_class_auroc`` on
    test, ``val_mean_auroc`` / ``val_per_class_auroc`` / ``best_epoch`` of the kept model,
    ``history`` (per epoch: mean train loss, val mean AUROC) and ``test_scores`` (a tensor).

    Example::

        >>> from spcl_fast.data import SyntheticCXR
        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> ds = SyntheticCXR("val", num_images=8, image_size=32)
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
        >>> res = finetune(enc, ds, ds, ds, FinetuneSettings(epochs=1, batch_size=4),
        ...                torch.device("cpu"))  # doctest: +ELLIPSIS
        epoch 1/1: train loss ..., val mean AUROC ...
        >>> sorted(res["per_class_auroc"])[:2], len(res["history"])
        (['cardiomegaly', 'consolidation'], 1)
    """
    s = settings
    s.check()
    torch.manual_seed(s.seed)
    set_drop_path(encoder, s.drop_path)
    class_names = list(train.class_names)
    model = Classifier(encoder, len(class_names)).to(device)
    groups = param_groups_lrd(model, model.encoder, s.weight_decay, s.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))
    precision = resolve_precision(s.precision, device)
    loader = data_loader(train, s.batch_size, shuffle=True, num_workers=s.num_workers,
                         seed=s.seed, drop_last=len(train) > s.batch_size)
    val_labels = torch.as_tensor(val.labels)

    def validate(model):
        scores = predict(model, val, s.batch_size, device, transform, precision,
                         s.num_workers, desc="val")
        per_class, auc = multilabel_auroc(scores, val_labels)
        return auc, {"val_mean_auroc": auc, "val_per_class": per_class}, \
            f"val mean AUROC {auc:.4f}"

    fit = fit_keep_best(
        model, optimizer, loader, lambda logits, batch: masked_bce(logits,
                                                                   batch["labels"].to(device)),
        validate, epochs=s.epochs, lr=s.lr, min_lr=s.min_lr, warmup_epochs=s.warmup_epochs,
        grad_clip=s.grad_clip, device=device, precision=precision, transform=transform,
        desc="finetune", best_path=None if out_dir is None else Path(out_dir) / "finetune_best.pt",
        best_extra={"class_names": class_names, "settings": asdict(s)})
    val_auc, val_per_class = fit["best_score"], fit["best_record"]["val_per_class"]
    history = [{k: v for k, v in h.items() if k != "val_per_class"} for h in fit["history"]]
    scores = predict(model, test, s.batch_size, device, transform, precision, s.num_workers,
                     desc="test")
    per_class, mean_auc = multilabel_auroc(scores, torch.as_tensor(test.labels))
    return {
        "mean_auroc": mean_auc,
        "per_class_auroc": dict(zip(class_names, per_class, strict=True)),
        "val_mean_auroc": val_auc,
        "val_per_class_auroc": dict(zip(class_names, val_per_class, strict=True)),
        "best_epoch": fit["best_epoch"],
        "history": history,
        "steps": fit["steps"],
        "settings": copy.deepcopy(asdict(s)),
        "test_scores": scores,
    }
