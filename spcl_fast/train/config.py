"""Training configuration: one frozen dataclass, presets as plain functions, CLI overrides.

``python -m spcl_fast.train --preset NAME --key value ...``: every field below is a ``--key``
(dashes or underscores); unknown keys are rejected with the closest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run: frozen, JSON round-trippable, one ``--key`` per field.

    Fields (each documented by its comment below) group into data, model, method (S-PCL's
    partitions and loss; ``mae_*``/``dino_*`` settings for the baselines), optimisation and run.
    Presets (:data:`PRESETS`: ``demo``, ``smoke``, ``vit_{tiny,small,base,large}_{224,448,512}``)
    are functions returning a ``TrainConfig``; :func:`apply_overrides` applies ``--key value``
    strings; ``to_json()`` and ``from_dict(json.loads(...))`` save and load one.

    Example::

        >>> cfg = demo()
        >>> cfg.model, cfg.embed_dim, cfg.depth, cfg.batch_size, cfg.steps, cfg.keep
        ('vit_tiny_patch16', 192, 6, 64, 180, 0.5)
        >>> cfg = apply_overrides(cfg, {"steps": "10", "ratio-range": "0.3,0.7"})
        >>> cfg.steps, cfg.ratio_range
        (10, (0.3, 0.7))
        >>> TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
        True
    """

    # --- data
    dataset: str = "synthetic"  # synthetic, a dataset of spcl_fast.data, or a pool: name+name
    data_root: str | None = None  # dataset folder (real datasets); a pool: one per dataset, a,b
    image_size: int = 64  # images are square, image_size x image_size pixels
    data_cache: str | None = None  # cache folder (python -m spcl_fast.data.prepare); pool: a,b
    num_images: int | None = None  # use only the first N training images (None: all)
    num_workers: int = 2  # DataLoader worker processes for real datasets
    normalize: str = "dataset"  # input intensity normalisation: dataset | image | equalize | none
    # --- model
    model: str = "vit_tiny_patch16"  # encoder preset from spcl_fast.nn.PRESETS
    patch_size: int = 8  # patch side in pixels; tokens per image = (image_size / patch_size)^2
    embed_dim: int | None = None  # override the preset's width
    depth: int | None = None  # override the preset's number of blocks
    num_heads: int | None = None  # override the preset's number of heads
    pos_embed: str = "sincos"  # position embeddings: sincos (fixed) | learned | none
    class_token: bool = False  # a learned [CLS]-like token per image/subset pools, not the mean
    # --- method
    method: str = "spcl"  # pre-training method
    ratio: float = 0.5  # fraction of an image's kept tokens in subset A
    ratio_range: tuple[float, float] | None = None  # draw the ratio per image from [lo, hi]
    keep: float = 1.0  # fraction of tokens used at all (the rest are in neither subset)
    block_size: int = 1  # assign k x k blocks of patches to subsets together (1: single tokens)
    shared_split: bool = False  # one split for the whole batch (no position-pattern shortcut)
    num_subsets: int = 2  # subsets per image (>2: equal sizes, loss averaged over all pairs)
    subset_jitter: float = 0.0  # independent intensity jitter per subset while training (0: off)
    subset_warp: float = 0.0  # independent small affine warp per subset while training (0: off)
    background_std: float = 0.0  # skip patches flatter than this x the image's std (0: off)
    temperature: float = 0.1  # InfoNCE temperature
    negatives: str = "cross"  # InfoNCE negatives: cross (CLIP-style) | all (SimCLR NT-Xent)
    proj_hidden: int = 512  # projector hidden width
    proj_dim: int = 128  # projector output size
    proj_depth: int = 1  # projector hidden layers
    predictor_hidden: int = 0  # width of an MLP predictor on one branch (0: none)
    layout: str = "packed"  # residual stream layout: packed | inplace
    impl: str = "auto"  # kernel implementation: auto | triton | torch
    mask_ratio: float = 0.75  # mae: fraction of patches hidden from the encoder
    decoder_dim: int = 512  # mae: decoder width
    decoder_depth: int = 8  # mae: decoder blocks
    decoder_heads: int = 16  # mae: decoder attention heads
    norm_pix_loss: bool = True  # mae: regress per-patch normalised pixels (else raw pixels)
    dino_local_crops: int = 10  # dino: local crops per image (plus 2 global crops)
    dino_global_size: int | None = None  # dino: global crop side (None: image_size)
    dino_local_size: int | None = None  # dino: local crop side (None: 96/224 of image_size)
    dino_out_dim: int = 65536  # dino: head output size (number of prototypes)
    teacher_temp: float = 0.04  # dino: teacher softmax temperature (the student's is 0.1)
    teacher_momentum: float = 0.996  # dino: teacher EMA momentum at step 0, cosine to 1 at the end
    # --- optimisation
    batch_size: int = 64  # images per optimizer step, summed over processes and accumulation steps
    accum_steps: int = 1  # micro-batches per optimizer step (the loss sees one at a time)
    steps: int = 200  # optimizer steps in total
    lr: float = 1e-3  # peak learning rate (after warmup)
    lr_base_batch: int = 0  # scale lr and min_lr by batch_size / lr_base_batch (0: as given)
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    weight_decay: float = 0.05  # AdamW decay, not applied to norms, biases, position embeddings
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast and a gradient scaler)
    compile: bool = False  # torch.compile the model (the first steps pay for compilation)
    fsdp: bool = False  # shard weights, gradients, optimizer over processes (FSDP2), not DDP
    plan_shards: int = 0  # partition RNG streams, one per data shard (0: one per process)
    # --- run
    device: str = "auto"  # cpu | cuda | cuda:N | auto (cuda when available)
    seed: int = 0  # seeds the model init, data order and partitions
    deterministic: bool = False  # torch deterministic algorithms (bitwise reruns; slower on GPU)
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    log_every: int = 5  # steps between metric lines in metrics.jsonl
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept in the run folder (the newest ones)
    peak_tflops: float | None = None  # device peak TFLOP/s for MFU (None: from the device name)
    tensorboard: bool = False  # also write TensorBoard scalars (when tensorboard is installed)
    out: str = ""  # output folder ('' picks runs/<preset>-<time>)
    probe: bool = True  # linear-probe the encoder at the end against its initialisation
    probe_steps: int = 300  # optimizer steps of each logistic-regression probe fit
    extra: dict = field(default_factory=dict)  # free-form notes saved with the config

    def to_json(self) -> str:
        """All fields as an indented JSON object (tuples become lists)."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config from a dict of field values (e.g. a loaded ``to_json()``); unknown keys
        raise ``ValueError``, lists become tuples where the field is a tuple."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce_loaded(v, hints[k]) for k, v in d.items()})


def demo() -> TrainConfig:
    """The no-argument demo: a small ViT on synthetic X-rays, ~70 s on 2 CPU cores.
    Two 25% subsets per image (``keep=0.5``): in the recipe study (``spcl_fast.eval.study``)
    they probe better than 50/50 splits of all tokens on both the synthetic and the real
    sample, at half the FLOPs."""
    return TrainConfig(embed_dim=192, depth=6, num_heads=3, batch_size=64, steps=180, keep=0.5)


def smoke() -> TrainConfig:
    """A few seconds, for tests."""
    return TrainConfig(
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
    ChestX-ray14's ~86k training images: set ``--steps`` for the data."""
    return TrainConfig(
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


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce_loaded(value, tp):
    base, _ = _strip_optional(tp)
    if value is not None and typing.get_origin(base) is tuple:
        return tuple(value)
    return value


def parse_value(key: str, text: str, tp):
    """Parse one ``--key value`` string into the field's type."""
    base, optional = _strip_optional(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typing.get_origin(base) is tuple:
            parts = [p for p in text.replace(",", " ").split() if p]
            elems = typing.get_args(base)
            if len(parts) != len(elems):
                raise ValueError(f"--{key.replace('_', '-')} takes {len(elems)} values "
                                 f"(e.g. 'a,b'), got {text!r}")
            return tuple(elem(p) for elem, p in zip(elems, parts, strict=True))
        if base is dict:
            return json.loads(text)
        return base(text)
    except ValueError as exc:
        if str(exc).startswith("--"):
            raise
        raise ValueError(f"--{key.replace('_', '-')}: cannot parse {text!r} as {tp}") from exc


def apply_overrides(config: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Return ``config`` with string overrides parsed and applied; unknown keys raise.

    Args:
        config: the config to start from (not modified: it is frozen).
        overrides: ``{key: text}``; keys are field names with dashes or underscores, texts are
            parsed into the field's type (``"none"`` for optional fields, ``"yes"``/``"no"``
            for booleans, ``"a,b"`` for pairs, JSON for ``extra``).

    Returns:
        a new :class:`TrainConfig`.

    Example::

        >>> cfg = apply_overrides(smoke(), {"lr": "3e-4", "class-token": "yes", "depth": "none"})
        >>> cfg.lr, cfg.class_token, cfg.depth
        (0.0003, True, None)
        >>> apply_overrides(smoke(), {"step": "5"})
        Traceback (most recent call last):
        ...
        ValueError: unknown option --step; did you mean --steps?
    """
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for raw_key, text in overrides.items():
        key = raw_key.replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = (
                f"; did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?"
                if close
                else ""
            )
            raise ValueError(f"unknown option --{raw_key}{hint}")
        changes[key] = parse_value(key, text, hints[key])
    return dataclasses.replace(config, **changes)
