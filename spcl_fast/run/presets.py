"""Presets: plain functions returning a :class:`~spcl_fast.run.config.TrainConfig`
(``--preset NAME``), from the CPU demo to ViT-L at 512 px on 8 GPUs.

Example::

    >>> smoke().optim.steps, PRESETS["vit_base_224"]().model.name
    (4, 'vit_base_patch16')
"""

from __future__ import annotations

from .config import TrainConfig


def demo() -> TrainConfig:
    """The no-argument demo: a small ViT (6 blocks x 192, patch 8) pre-trained at 64 px on the
    CPU on real NIH chest X-rays embedded in the package (``nih-demo``: the training patients
    only), then probed by patient for normal vs abnormal against its initialisation and raw
    pixels (:mod:`spcl_fast.eval.patient_probe`). Its S-PCL recipe is the best of the recipe
    study (``docs/study.md``): two 25% subsets per image (``keep=0.5``), the intra-image term
    (``intra_weight=1``) and batches of films of like mean brightness
    (``batch_grouping="similar"``, ``group_grid=1``). ``--dataset synthetic`` runs it on the
    built-in phantoms."""
    return TrainConfig().replace(embed_dim=192, depth=6, num_heads=3, batch_size=64, steps=180,
                                  keep=0.5, intra_weight=1.0, batch_grouping="similar",
                                  group_grid=1, dataset="nih-demo", num_workers=0)


def smoke() -> TrainConfig:
    """A few seconds, for tests."""
    return TrainConfig().replace(
        embed_dim=64,
        depth=2,
        num_heads=2,
        batch_size=8,
        steps=4,
        warmup_steps=1,
        image_size=32,
        num_images=64,
        proj_hidden=64,
        proj_dim=32,
        log_every=1,
        probe=False,
        threads=1,  # tiny ops: extra threads only contend (badly, on a shared machine)
    )


def at_scale(model: str, image_size: int, batch_size: int) -> TrainConfig:
    """S-PCL pre-training of ``model`` (a ``spcl_fast.nn`` preset, patch 16) at ``image_size``
    on a real dataset (name it with ``--dataset`` and ``--data-root``): bf16, global batch
    ``batch_size`` sized for 8 GPUs of 80 GB (on fewer, keep it and add ``--accum-steps``), the
    learning rate given per 256 images (MoCo v3's ViT recipe) and scaled to the batch,
    checkpoints every 1,000 steps. 20,000 steps at batch 2048 are ~470 epochs of
    ChestX-ray14's ~86k training images: set ``--steps`` for the data. The S-PCL recipe is the
    demo's (keep 0.5, the intra-image term, batches of like brightness), chosen by the recipe
    study at 64 px only (``docs/study.md``); ``--keep 1 --intra-weight 0 --batch-grouping
    random`` gives plain S-PCL."""
    return TrainConfig().replace(
        dataset="chestxray14",
        model=model,
        patch_size=16,
        image_size=image_size,
        batch_size=batch_size,
        steps=20_000,
        lr=1.5e-4,
        lr_base_batch=256,
        min_lr=1e-6,
        warmup_steps=1_000,
        precision="bf16",
        num_workers=8,
        log_every=20,
        save_every=1_000,
        keep_last=3,
        probe=False,
        keep=0.5,
        intra_weight=1.0,
        batch_grouping="similar",
        group_grid=1,
    )


# Global batches per (model, image side): ~50k tokens per 80 GB GPU for ViT-B, fewer for ViT-L
# (wider and twice as deep); attention memory is linear in the sequence (no score matrix).
def vit_tiny_224() -> TrainConfig:
    """ViT-Ti/16 at 224 px, global batch 2048."""
    return at_scale("vit_tiny_patch16", 224, 2048)


def vit_small_224() -> TrainConfig:
    """ViT-S/16 at 224 px, global batch 2048."""
    return at_scale("vit_small_patch16", 224, 2048)


def vit_base_224() -> TrainConfig:
    """ViT-B/16 at 224 px, global batch 2048."""
    return at_scale("vit_base_patch16", 224, 2048)


def vit_large_224() -> TrainConfig:
    """ViT-L/16 at 224 px, global batch 1024."""
    return at_scale("vit_large_patch16", 224, 1024)


def vit_tiny_448() -> TrainConfig:
    """ViT-Ti/16 at 448 px (784 tokens per image), global batch 1024."""
    return at_scale("vit_tiny_patch16", 448, 1024)


def vit_small_448() -> TrainConfig:
    """ViT-S/16 at 448 px, global batch 1024."""
    return at_scale("vit_small_patch16", 448, 1024)


def vit_base_448() -> TrainConfig:
    """ViT-B/16 at 448 px, global batch 512."""
    return at_scale("vit_base_patch16", 448, 512)


def vit_large_448() -> TrainConfig:
    """ViT-L/16 at 448 px, global batch 256."""
    return at_scale("vit_large_patch16", 448, 256)


def vit_tiny_512() -> TrainConfig:
    """ViT-Ti/16 at 512 px (1024 tokens per image), global batch 1024."""
    return at_scale("vit_tiny_patch16", 512, 1024)


def vit_small_512() -> TrainConfig:
    """ViT-S/16 at 512 px, global batch 512."""
    return at_scale("vit_small_patch16", 512, 512)


def vit_base_512() -> TrainConfig:
    """ViT-B/16 at 512 px, global batch 512."""
    return at_scale("vit_base_patch16", 512, 512)


def vit_large_512() -> TrainConfig:
    """ViT-L/16 at 512 px, global batch 256."""
    return at_scale("vit_large_patch16", 512, 256)


PRESETS = {
    f.__name__: f
    for f in (
        demo,
        smoke,
        vit_tiny_224,
        vit_small_224,
        vit_base_224,
        vit_large_224,
        vit_tiny_448,
        vit_small_448,
        vit_base_448,
        vit_large_448,
        vit_tiny_512,
        vit_small_512,
        vit_base_512,
        vit_large_512,
    )
}
