"""Segmentation (SIIM-ACR pneumothorax): a light decoder on the encoder's patch tokens.

The encoder's final-normed patch tokens ``(B, N, D)`` are laid out on their ``g x g`` grid and
decoded to one logit per pixel by either

* ``"progressive"`` (default): a 1x1 conv to 128 channels, then one stage per factor of 2 of the
  patch size (2x bilinear upsampling, 3x3 conv, GroupNorm, GELU; channels halve down to 16),
  a 1x1 conv to one logit (bilinear to the image size if the patch is not a power of two);
* ``"linear"``: a 1x1 conv to ``p*p`` logits per patch, pixel-shuffled to full resolution (the
  linear probe of segmentation).

The encoder is frozen (run without gradients) unless ``finetune_encoder`` is set, when it is
trained with layer-wise learning-rate decay like :mod:`spcl_fast.eval.finetune`. The loss is
pixel BCE plus soft Dice. The decoder with the best val mean Dice is kept and scored on test.

Dice is computed per image on masks thresholded at probability 0.5. Empty masks follow the
SIIM-ACR Kaggle convention: an empty prediction on an empty ground truth scores 1, any
predicted pixel on an empty ground truth scores 0. Reported: ``dice`` (mean over all test
images, the Kaggle metric), ``dice_positive`` (mean over images with a pneumothorax),
``dice_empty`` (fraction of empty images predicted empty) and the counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import tyro
from torch import nn
from tqdm.auto import tqdm

from ..run.precision import autocast, resolve_precision
from .encoders import set_drop_path
from .finetune import (
    check_fit_settings,
    fit_keep_best,
    param_groups_lrd,
)
from .linear_probe import data_loader
from .metrics import dice_per_image, dice_summary

DECODERS = ("progressive", "linear")


class SegmentationDecoder(nn.Module):
    """Patch tokens ``(B, N, D)`` on a ``grid x grid`` layout to logits ``(B, 1, S, S)``.

    Example::

        >>> dec = SegmentationDecoder(embed_dim=64, grid=4, patch_size=8)
        >>> dec(torch.randn(2, 16, 64)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, embed_dim: int, grid: int, patch_size: int, kind: str = "progressive",
                 channels: int = 128):
        super().__init__()
        if kind not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {kind!r}")
        self.grid, self.patch_size, self.kind = grid, patch_size, kind
        if kind == "linear":
            self.net = nn.Sequential(nn.Conv2d(embed_dim, patch_size**2, 1),
                                     nn.PixelShuffle(patch_size))
            return
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, channels, 1)]
        c = channels
        for _ in range(int(math.log2(patch_size))):
            out = max(c // 2, 16)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(min(8, out), out), nn.GELU()]
            c = out
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        x = self.net(x)
        size = self.grid * self.patch_size
        if x.shape[-1] != size:  # patch sizes that are not powers of two
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x


class Segmenter(nn.Module):
    """Encoder (frozen unless ``train_encoder``) + :class:`SegmentationDecoder`."""

    def __init__(self, encoder: nn.Module, decoder: SegmentationDecoder, train_encoder: bool):
        super().__init__()
        self.encoder, self.decoder, self.train_encoder = encoder, decoder, train_encoder
        encoder.requires_grad_(train_encoder)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_encoder:
            self.encoder.eval()  # a frozen encoder also keeps drop path off
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            tokens = self.encoder.patch_tokens(x)
        return self.decoder(tokens)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel BCE + soft Dice (per image, ``1 - (2 sum(p g) + 1) / (sum p + sum g + 1)``)."""
    logits, masks = logits.float(), masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    p = logits.sigmoid().flatten(1)
    g = masks.flatten(1)
    soft_dice = (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)
    return bce + (1 - soft_dice).mean()


def masks_of(batch: dict) -> torch.Tensor:
    """The batch's masks as float ``(B, 1, S, S)`` (datasets may give ``(S, S)`` per item)."""
    m = batch["mask"]
    return (m[:, None] if m.dim() == 3 else m).float()


@torch.no_grad()
def evaluate_dice(model: nn.Module, dataset, batch_size: int, device: torch.device,
                  transform=None, precision="fp32", num_workers: int = 0, threshold: float = 0.5,
                  desc: str = "dice") -> dict:
    """Per-image Dice of ``model`` on ``dataset`` (see the module docstring) and its summary."""
    was_training = model.training
    model.eval()
    dice, positive = [], []
    loader = data_loader(dataset, batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        x = batch["image"].to(device, non_blocking=True)
        x = transform(x) if transform is not None else x
        with autocast(precision, device):
            prob = model(x).float().sigmoid().cpu()
        target = masks_of(batch) > 0.5
        dice.append(dice_per_image(prob > threshold, target))
        positive.append(target.flatten(1).any(1))
    model.train(was_training)
    return dice_summary(torch.cat(dice), torch.cat(positive))


@dataclass
class SegmentSettings:
    """How ``segment`` trains: one ``--flag`` of ``python -m spcl_fast.eval segment`` per field
    (but ``batch_size`` and ``num_workers``: the command's ``--batch-size``/``--workers``).
    :meth:`check` (which ``segment`` calls) rejects values no run can use."""

    epochs: int = 10  # passes over the training split
    batch_size: Annotated[int, tyro.conf.Suppress] = 32  # images per step
    lr: float = 1e-3  # peak learning rate of the decoder (after warmup)
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    layer_decay: float = 0.75  # per-block decay of the encoder's lr (with finetune_encoder)
    encoder_lr_scale: float = 0.1  # encoder lr relative to the decoder's (with finetune_encoder)
    weight_decay: float = 0.05  # AdamW decay (not on norms, biases, position embeddings)
    warmup_epochs: float = 1.0  # linear warmup length
    drop_path: float = 0.1  # stochastic depth (with finetune_encoder)
    decoder: str = "progressive"  # progressive | linear
    finetune_encoder: bool = False  # train the encoder too (default: frozen)
    threshold: float = 0.5  # probability threshold of a foreground pixel
    precision: str = "auto"  # auto (bf16/fp16 on a GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0  # decoder init, data order
    num_workers: Annotated[int, tyro.conf.Suppress] = 0  # DataLoader workers

    def check(self) -> None:
        check_fit_settings(self)
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got "
                             f"{self.decoder!r}")
        if self.encoder_lr_scale < 0:
            raise ValueError(f"encoder_lr_scale must be >= 0, got {self.encoder_lr_scale!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")


def has_masks(dataset) -> bool:
    """Whether items of ``dataset`` carry a ``"mask"`` (checks the first item)."""
    return len(dataset) > 0 and "mask" in dataset[0]


def segment(encoder: nn.Module, train, val, test, settings: SegmentSettings,
            device: torch.device, transform=None, out_dir: str | Path | None = None) -> dict:
    """Train a decoder (and optionally the encoder) on ``train``'s masks; keep the best epoch by
    val mean Dice; score it on ``test``. Items must hold ``"image"`` and ``"mask"``.

    Returns the test Dice summary (``dice``, ``dice_positive``, ``dice_empty``, counts), the
    kept model's ``val`` summary, ``best_epoch`` and ``history``.

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> class Squares(torch.utils.data.Dataset):
        ...     def __len__(self): return 4
        ...     def __getitem__(self, i):
        ...         m = torch.zeros(1, 32, 32); m[:, 8:16 + 4 * i, 8:20] = float(i > 0)
        ...         return {"image": m * 0.8 + 0.1, "mask": m, "id": str(i)}
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=1)
        >>> res = segment(enc, Squares(), Squares(), Squares(), SegmentSettings(epochs=1,
        ...               batch_size=2), torch.device("cpu"))  # doctest: +ELLIPSIS
        epoch 1/1: train loss ..., val Dice ... (positive images ...)
        >>> res["num_images"], res["num_positive"]
        (4, 3)
    """
    for name, ds in (("train", train), ("val", val), ("test", test)):
        if not has_masks(ds):
            raise ValueError(f"segment: the {name} split has no masks (items need a 'mask')")
    s = settings
    s.check()
    torch.manual_seed(s.seed)
    set_drop_path(encoder, s.drop_path if s.finetune_encoder else 0.0)
    decoder = SegmentationDecoder(encoder.embed_dim, encoder.patch_embed.grid_size,
                                  encoder.patch_embed.patch_size, s.decoder)
    model = Segmenter(encoder, decoder, s.finetune_encoder).to(device)
    groups = [{"params": list(decoder.parameters()), "weight_decay": s.weight_decay,
               "lr_scale": 1.0}]
    if s.finetune_encoder:
        enc_groups = param_groups_lrd(encoder, encoder, s.weight_decay, s.layer_decay)
        for g in enc_groups:
            g["lr_scale"] *= s.encoder_lr_scale
        groups += enc_groups
    optimizer = torch.optim.AdamW(groups, lr=s.lr)
    precision = resolve_precision(s.precision, device)
    loader = data_loader(train, s.batch_size, shuffle=True, num_workers=s.num_workers,
                         seed=s.seed, drop_last=len(train) > s.batch_size)

    def validate(model):
        res = evaluate_dice(model, val, s.batch_size, device, transform, precision,
                            s.num_workers, s.threshold, desc="val")
        return res["dice"], {"val_dice": res["dice"], "val_dice_positive": res["dice_positive"],
                             "val": res}, \
            f"val Dice {res['dice']:.4f} (positive images {res['dice_positive']:.4f})"

    fit = fit_keep_best(
        model, optimizer, loader,
        lambda logits, batch: segmentation_loss(logits, masks_of(batch).to(device)), validate,
        epochs=s.epochs, lr=s.lr, min_lr=s.min_lr, warmup_epochs=s.warmup_epochs, grad_clip=0.0,
        device=device, precision=precision, transform=transform, desc="segment",
        best_path=None if out_dir is None else Path(out_dir) / "segment_best.pt",
        best_extra={"settings": asdict(s)})
    val_res = fit["best_record"]["val"]
    history = [{k: v for k, v in h.items() if k != "val"} for h in fit["history"]]
    test_res = evaluate_dice(model, test, s.batch_size, device, transform, precision,
                             s.num_workers, s.threshold, desc="test")
    return {**test_res, "val": val_res, "best_epoch": fit["best_epoch"], "history": history,
            "steps": fit["steps"], "settings": asdict(s), "model": model}
