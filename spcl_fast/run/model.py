"""A run's model: the encoder its ``model`` section describes and the method its ``method``
names, built from that method's section (``METHODS[name].from_config``), seeded by
``run.seed`` so every build of a config starts from the same weights.

Example::

    >>> from spcl_fast.run.presets import smoke
    >>> model = build_model(smoke())
    >>> type(model).__name__, model.encoder.embed_dim, model.encoder.num_patches
    ('SPCL', 64, 16)
"""

from __future__ import annotations

import dataclasses

import torch

from ..methods import METHODS, BuildContext
from ..nn import VisionTransformer, create_vit
from .config import FIELDS, ModelConfig, TrainConfig


def build_encoder(model: ModelConfig, image_size: int) -> VisionTransformer:
    """The ViT of a ``model`` section for ``image_size`` pixels (not seeded here)."""
    overrides = {k: getattr(model, k) for k in ("embed_dim", "depth", "num_heads")
                 if getattr(model, k) is not None}
    return create_vit(model.name, img_size=image_size, patch_size=model.patch_size,
                      pos_embed=model.pos_embed, class_token=model.class_token,
                      patch_norm=model.patch_norm, impl=model.impl, **overrides)


def build_model(config: TrainConfig, global_batch_loss: bool = False) -> torch.nn.Module:
    """The encoder and method of ``config``, initialised from ``config.run.seed``.
    ``global_batch_loss``: a contrastive loss over every process's embeddings (needs a process
    group; methods without such a loss ignore it)."""
    torch.manual_seed(config.run.seed)
    encoder = build_encoder(config.model, config.data.image_size)
    context = BuildContext(total_steps=config.optim.steps, gather_distributed=global_batch_loss)
    settings = dataclasses.asdict(config.method_section)
    return METHODS[config.method].from_config(encoder, settings, context)


def _model_settings(config: TrainConfig) -> dict:
    """What the model is built from, by flag name: the method, the image size, the ``model``
    section and the method's section."""
    names = {"method", "image_size"} | {flag for flag, (section, _) in FIELDS.items()
                                        if section in ("model", config.method)}
    return {k: v for k, v in config.flat().items() if k in names}


def architecture_mismatch(saved: dict, config: TrainConfig, exc: Exception) -> str:
    """Why a checkpoint's weights (trained with the config dict ``saved``) do not load into
    ``config``'s model, in one line."""
    old = _model_settings(TrainConfig.from_dict(saved, strict=False)) if saved else {}
    now = _model_settings(config)
    differ = [f"{k} {old[k]!r} (now {v!r})" for k, v in now.items()
              if k in old and old[k] != v]
    if differ:
        return ("the checkpoint's model was built with other settings: " + "; ".join(differ)
                + ". Resume without changing them, or start a new run")
    return "the checkpoint's weights do not fit this model: " + str(exc).splitlines()[0]
