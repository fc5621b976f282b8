"""Export an encoder as safetensors in timm's ``VisionTransformer`` layout.

``python -m spcl_fast.export --checkpoint C --out DIR`` writes

* ``DIR/model.safetensors``: the encoder's tensors, fp32, named and shaped exactly as the state
  dict of ``timm.models.vision_transformer.VisionTransformer(**timm_kwargs)`` with
  ``class_token=False, global_pool="avg", fc_norm=False, num_classes=0, in_chans=1``:
  ``patch_embed.proj.weight (D, 1, p, p)``, ``patch_embed.proj.bias (D,)``,
  ``pos_embed (1, N, D)`` (N = (S/p)^2 rows, no class-token row),
  ``blocks.{i}.norm1.{weight,bias} (D,)``, ``blocks.{i}.attn.qkv.weight (3D, D)`` (rows q, k, v;
  heads contiguous inside each), ``blocks.{i}.attn.qkv.bias (3D,)``,
  ``blocks.{i}.attn.proj.{weight (D, D), bias (D,)}``, ``blocks.{i}.norm2.{weight,bias}``,
  ``blocks.{i}.mlp.fc1.{weight (4D, D), bias}``, ``blocks.{i}.mlp.fc2.{weight (D, 4D), bias}``,
  ``norm.{weight,bias} (D,)``. Nothing else: no ``cls_token``, ``fc_norm`` or ``head``.
  An encoder trained with ``class_token=True`` adds ``cls_token (1, 1, D)`` and is exported
  with ``class_token=True, no_embed_class=True, global_pool="token"`` instead (its class token
  gets no position embedding, so ``pos_embed`` keeps N rows, and it is the pooled output).
* ``DIR/config.json``: ``timm_model`` and ``timm_kwargs`` (everything ``create_model`` needs),
  the input contract (1 channel in [0, 1], then ``normalize`` with ``mean``/``std``), and the
  run's training config.

Why these kwargs: by default the encoder has no class token, and a zero class token would not
be neutral (every patch attends to it), so the timm model must be built without one
(``class_token=False``, which also gives ``pos_embed`` exactly N rows). timm's
``global_pool="avg"`` on its own turns on ``fc_norm`` (LayerNorm after pooling, weights under
``fc_norm.*``); ``fc_norm=False`` keeps the final LayerNorm per token (``norm.*``) before the
mean, which is this encoder's maths. With these kwargs ``model(x)`` equals
``encoder(x)`` (the pooled ``(B, D)`` embedding) and ``model.forward_features(x)`` equals
``encoder.forward_features(x)`` (``(B, N, D)``; ``(B, 1 + N, D)``, class token first, for a
class-token encoder, whose ``model(x)`` is the class token's output).

Loading in timm (strict: every tensor must match)::

    import json, timm
    cfg = json.load(open("DIR/config.json"))
    model = timm.create_model(cfg["timm_model"], checkpoint_path="DIR/model.safetensors",
                              **cfg["timm_kwargs"])

or ``model.load_state_dict(safetensors.torch.load_file("DIR/model.safetensors"))`` on a model
built with the same kwargs. (``pretrained=True, pretrained_cfg_overlay=dict(file=...)`` also
reads the file but loads non-strictly, and for names whose default weights are ``.npz``, such as
``vit_tiny_patch16_224``, hands the file to the npz reader; prefer ``checkpoint_path``.)
The reverse direction, timm or MAE weights into this package's ViT, is
:func:`spcl_fast.eval.load_encoder`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .cli import THREADS_HELP, ArgumentParser, positive_int, set_threads
from .data import synthetic
from .eval.encoders import load_encoder, vit_state_keys
from .run.checkpoint import list_checkpoints

# timm's registered name for each preset (at its default 224 px; the kwargs set the real size).
TIMM_NAMES = {
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
}
FORMAT = "spcl_fast-timm-vit"


def timm_kwargs(encoder) -> dict:
    """``timm.create_model`` keyword arguments that build a VisionTransformer with exactly this
    encoder's tensors and forward pass (see the module docstring)."""
    pe = encoder.patch_embed
    blk = encoder.blocks[0]
    return {
        "img_size": pe.img_size, "patch_size": pe.patch_size, "in_chans": pe.proj.in_channels,
        "num_classes": 0, "embed_dim": encoder.embed_dim, "depth": len(encoder.blocks),
        "num_heads": encoder.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features / encoder.embed_dim,
        "qkv_bias": blk.attn.qkv.bias is not None, **_pooling(encoder), "fc_norm": False,
    }


def _pooling(encoder) -> dict:
    """Mean of the patch tokens, or (``class_token=True`` encoders) the class token, which
    has no position embedding: timm's ``no_embed_class``."""
    if encoder.num_prefix_tokens:
        return {"class_token": True, "no_embed_class": True, "global_pool": "token"}
    return {"class_token": False, "global_pool": "avg"}


def _timm_name(encoder, config) -> str:
    name = TIMM_NAMES.get(config.model.name) if config is not None else None
    if name is None:
        by_width = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}
        name = by_width.get(encoder.embed_dim, "vit_base") + "_patch16_224"
    return name


def export_encoder(checkpoint: str | Path, out_dir: str | Path,
                   image_size: int | None = None) -> dict:
    """Write ``model.safetensors`` and ``config.json`` for ``checkpoint`` (anything
    :func:`spcl_fast.eval.load_encoder` reads) into ``out_dir``; returns the config dict.

    Example::

        >>> import tempfile
        >>> from spcl_fast.train import TrainConfig, train
        >>> run = tempfile.mkdtemp()
        >>> _ = train(TrainConfig().replace(
        ...     embed_dim=32, depth=1, num_heads=2, batch_size=4, steps=1, warmup_steps=1,
        ...     image_size=32, num_images=8, proj_hidden=16, proj_dim=8, probe=False),
        ...     run)  # doctest: +ELLIPSIS
        S-PCL...
        >>> cfg = export_encoder(run, run + "/export")
        >>> cfg["timm_kwargs"]["class_token"], cfg["timm_kwargs"]["global_pool"]
        (False, 'avg')
    """
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise RuntimeError("export needs the safetensors package (pip install safetensors)") \
            from exc
    out_dir = Path(out_dir)
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder")
    if list_checkpoints(out_dir) or (out_dir / "metrics.jsonl").exists():
        raise ValueError(f"{out_dir} holds a training run: exporting into it would replace its "
                         "config.json; choose another folder")
    loaded = load_encoder(checkpoint, image_size=image_size)
    encoder = loaded.encoder
    state = {k: v.detach().float().contiguous().clone() for k, v in encoder.state_dict().items()}
    kwargs = timm_kwargs(encoder)
    stats = loaded.stats or (synthetic.MEAN, synthetic.STD)
    expected = vit_state_keys(kwargs["depth"], kwargs["qkv_bias"], kwargs["class_token"])
    if set(state) != expected:  # the layout promise above, checked on every export
        raise RuntimeError(f"encoder state does not match the timm layout: "
                           f"{sorted(set(state) ^ expected)[:6]}")
    config = {
        "format": FORMAT,
        "timm_model": _timm_name(encoder, loaded.config),
        "timm_kwargs": kwargs,
        "image_size": kwargs["img_size"],
        "input": "1 channel, intensities in [0, 1], then the normalisation below",
        "normalize": loaded.normalize,
        # The intensity statistics of the "dataset" mode, as the run used them.
        "mean": stats[0] if loaded.normalize == "dataset" else None,
        "std": stats[1] if loaded.normalize == "dataset" else None,
        "source": {"kind": loaded.kind, "path": loaded.source, "notes": loaded.notes},
        "spcl_config": None if loaded.config is None else json.loads(loaded.config.to_json()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = ", ".join(f"{k}={kwargs[k]!r}" for k in _pooling(encoder))
    metadata = {"format": "pt", "layout": f"timm.VisionTransformer({layout}, fc_norm=False, "
                "num_classes=0, in_chans=1)"}
    save_file(state, str(out_dir / "model.safetensors"), metadata=metadata)
    umask = os.umask(0)  # safetensors writes 0600; the file is as readable as config.json
    os.umask(umask)
    os.chmod(out_dir / "model.safetensors", 0o666 & ~umask)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(
        prog="python -m spcl_fast.export",
        description="Export an encoder as timm-layout safetensors (+ config.json).")
    parser.add_argument("--checkpoint", required=True,
                        help="spcl_fast run folder or ckpt-*.pt (or timm/MAE weights)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=None,
                        help="export for this input size (position embeddings adapted)")
    parser.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(args.threads)
    try:
        config = export_encoder(args.checkpoint, args.out, args.image_size)
    except (OSError, ValueError) as exc:  # EncoderLoadError, CheckpointError too
        raise SystemExit(f"error: {exc}") from None
    kw = ", ".join(f"{k}={v!r}" for k, v in config["timm_kwargs"].items())
    weights = str(Path(args.out) / "model.safetensors")
    print(f"wrote {weights} and config.json\n"
          f"load in timm:\n  timm.create_model({config['timm_model']!r}, "
          f"checkpoint_path={weights!r}, {kw})\n"
          f"inputs: 1 channel in [0, 1], normalize={config['normalize']!r}")
    return config


if __name__ == "__main__":
    main()
