"""Encoders for evaluation: from an spcl_fast checkpoint, from timm / MAE ViT weights, or random.

``load_encoder(source, ...)`` accepts

* an spcl_fast run folder or ``ckpt-*.pt`` file: the ViT is rebuilt from the saved config
  (``state["config"]``) and loaded from the ``encoder.*`` keys of ``state["model"]``;
* a folder or file written by ``python -m spcl_fast.export`` (``model.safetensors`` plus
  ``config.json``);
* a timm ``VisionTransformer`` or MAE state dict (``.pth``/``.pt``/``.bin``/``.safetensors``;
  MAE nests it under ``"model"``): the class token, register tokens, classifier head, MAE
  decoder and mask token are dropped, the position embedding loses its class-token row, and
  3-channel patch weights are summed to 1 channel (timm's own rule: the same as feeding the
  grey image to all three channels). Width, depth, patch size and MLP ratio come from the
  weights; the number of heads (which weights cannot tell) from ``model``'s preset, the
  export's config.json, or the standard ViT table (64-dim heads; ViT-H: 16 heads);
* ``"none"``: random initialisation of a preset (``model`` = a name from
  :data:`spcl_fast.nn.PRESETS`) or of the architecture of a run (``model`` = a run folder,
  checkpoint or ``config.json``; seeded like the training engine, so it is exactly the
  "init" encoder that the engine's own probe compares against).

Position embeddings follow the target image size: a run with fixed sin-cos embeddings gets them
regenerated for the new grid, learned ones are resized bicubically, and a table that is not a
square grid (after its class-token row) is an error. Every file is read with
``torch.load(weights_only=True)`` (MAE's ``args`` namespace is the one extra type allowed) or
safetensors.

Input normalisation travels with the encoder (``LoadedEncoder.normalize`` and ``.stats``): the
run's own ``normalize`` mode and intensity mean/std (``intensity_stats`` of the checkpoint, or
the export's ``mean``/``std``) for spcl_fast checkpoints and exports, the training default
(``"dataset"``) for random presets, and ``"image"`` (each image to zero mean, unit variance) for
external weights, whose pixel statistics this package cannot know. Where ``"dataset"`` mode has
no recorded statistics they are measured as the training engine measures them (fixed constants
for the synthetic set, the first 256 training images of a real one): see
:func:`spcl_fast.run.data.intensity_stats`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import synthetic
from ..nn import PRESETS, VisionTransformer, create_vit, resize_pos_embed
from ..run.checkpoint import list_checkpoints, load_checkpoint, load_error
from ..run.config import TrainConfig
from ..run.data import normalizer
from ..run.model import build_encoder

EXTERNAL_NORMALIZE = "image"
# Heads of the standard ViT widths (timm / MAE presets); other widths need a ``model`` preset.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Keys of timm / MAE checkpoints that have no counterpart in an encoder without a class token.
_DROPPED_PREFIXES = ("cls_token", "reg_token", "dist_token", "mask_token", "head.", "head_dist.",
                     "decoder_", "decoder.", "pre_logits.", "fc_norm.")
_STRIP_PREFIXES = ("module.", "encoder.", "backbone.", "model.")


class EncoderLoadError(ValueError):
    """A checkpoint cannot be turned into an encoder (not found, wrong kind, incompatible)."""


@dataclass
class LoadedEncoder:
    """An encoder ready for evaluation and where it came from.

    Attributes:
        encoder: the :class:`~spcl_fast.nn.VisionTransformer`, on CPU, in eval mode.
        kind: ``"spcl"`` | ``"export"`` | ``"timm"`` | ``"mae"`` | ``"none"``.
        source: the path (or ``"none"``) it was loaded from; for a run folder the checkpoint
            file actually read.
        normalize: input normalisation mode (see :func:`spcl_fast.data.normalize_images`).
        stats: ``(mean, std)`` of the ``"dataset"`` mode as training used them, or ``None``
            when not recorded (then :func:`~spcl_fast.run.data.intensity_stats` of the
            evaluated data).
        config: the run's :class:`~spcl_fast.run.config.TrainConfig` (spcl checkpoints,
            exports with one, and ``none`` built like a run), else ``None``.
        notes: what the conversion dropped or changed, for the results file.
    """

    encoder: VisionTransformer
    kind: str
    source: str
    normalize: str
    config: TrainConfig | None = None
    notes: list[str] = field(default_factory=list)
    stats: tuple[float, float] | None = None

    @property
    def image_size(self) -> int:
        return self.encoder.patch_embed.img_size

    def transform(self, fallback_stats: tuple[float, float] | None = None):
        """The input transform ``(B, 1, S, S) in [0, 1] -> normalised`` with this encoder's mode
        and statistics (``fallback_stats`` where none were recorded), as training applied it."""
        return normalizer(self.normalize,
                          self.stats or fallback_stats or (synthetic.MEAN, synthetic.STD))

    def describe(self) -> dict:
        enc = self.encoder
        return {
            "kind": self.kind, "source": self.source, "normalize": self.normalize,
            "stats": list(self.stats) if self.stats else None,
            "image_size": enc.patch_embed.img_size, "patch_size": enc.patch_embed.patch_size,
            "embed_dim": enc.embed_dim, "depth": enc.depth, "num_heads": enc.num_heads,
            "parameters": sum(p.numel() for p in enc.parameters()), "notes": list(self.notes),
        }


def load_encoder(
    source: str | Path,
    model: str | None = None,
    image_size: int | None = None,
    patch_size: int | None = None,
    normalize: str | None = None,
) -> LoadedEncoder:
    """Load an encoder for evaluation (see the module docstring for what ``source`` may be).

    Args:
        source: checkpoint file or folder, or ``"none"`` for random initialisation.
        model: preset name (``spcl_fast.nn.PRESETS``) for ``none`` and to fix the number of
            heads of external weights; for ``none`` also a run folder / checkpoint /
            ``config.json`` whose architecture to rebuild. Default ``vit_small_patch16``.
        image_size: side of the input images; default: the run's, else the grid of the
            weights' position embeddings, else 224. Position embeddings are adapted to it.
        patch_size: patch side for ``none`` with a preset (default 16).
        normalize: override the input normalisation mode.

    Example::

        >>> enc = load_encoder("none", model="vit_tiny_patch16", image_size=32, patch_size=8)
        >>> enc.encoder(torch.rand(2, 1, 32, 32)).shape, enc.kind, enc.normalize
        (torch.Size([2, 192]), 'none', 'dataset')
    """
    if str(source) == "none":
        loaded = _random_encoder(model, image_size, patch_size)
    else:
        path = Path(source)
        if not path.exists():
            raise EncoderLoadError(
                f"checkpoint not found: {path} (use --checkpoint none for random initialisation)"
            )
        loaded = _load_path(path, model, image_size)
    if normalize is not None:
        loaded.normalize = normalize
    loaded.encoder.eval()
    return loaded


# --------------------------------------------------------------------------- sources


def _random_encoder(model: str | None, image_size: int | None, patch_size: int | None):
    model = model or "vit_small_patch16"
    if model in PRESETS:
        size = image_size or 224
        encoder = create_vit(model, img_size=size, patch_size=patch_size or 16)
        normalize = TrainConfig().data.normalize
        return LoadedEncoder(encoder, "none", "none", normalize,
                             notes=[f"random init of preset {model}"])
    path = Path(model)
    if not path.exists():
        raise EncoderLoadError(
            f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
            "existing run folder, checkpoint or config.json"
        )
    config, stats = _config_of(path)
    if image_size is not None:
        config = config.replace(image_size=image_size)
    # Seeded exactly like the run's build_model: the same init its probe compares against.
    torch.manual_seed(config.run.seed)
    encoder = build_encoder(config.model, config.data.image_size)
    return LoadedEncoder(encoder, "none", "none", config.data.normalize, config,
                         [f"random init of the architecture of {path}"], stats)


def run_config(saved: dict, where: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` of a saved config dict (any version's: keys this version does
    not know are ignored)."""
    try:
        return TrainConfig.from_dict(saved, strict=False)
    except (TypeError, ValueError) as exc:
        raise EncoderLoadError(f"{where}: not a training config ({exc})") from None


def _config_of(path: Path) -> tuple[TrainConfig, tuple[float, float] | None]:
    """The training config of a run folder, checkpoint or config.json, and the run's intensity
    statistics where recorded."""
    if path.is_file() and path.suffix == ".json":
        return run_config(json.loads(path.read_text()), path), None
    if path.is_dir() and not list_checkpoints(path):
        if not (path / "config.json").exists():
            raise EncoderLoadError(f"{path} holds no spcl_fast run (no ckpt-*.pt, config.json)")
        summary = path / "summary.json"
        stats = json.loads(summary.read_text()).get("intensity_stats") if summary.exists() \
            else None
        return run_config(json.loads((path / "config.json").read_text()), path), _stats(stats)
    state, _ = load_checkpoint(path)
    if not isinstance(state, dict) or "config" not in state:
        raise EncoderLoadError(f"{path} holds no spcl_fast training config")
    # Before checkpoints recorded their statistics the engine always used the synthetic ones.
    return run_config(state["config"], path), _stats(state.get("intensity_stats")) or (
        synthetic.MEAN, synthetic.STD)


def _stats(value) -> tuple[float, float] | None:
    return (float(value[0]), float(value[1])) if value else None


def _load_path(path: Path, model: str | None, image_size: int | None) -> LoadedEncoder:
    if path.is_dir():
        if list_checkpoints(path):
            return _from_spcl_state(*load_checkpoint(path), image_size)
        if (path / "model.safetensors").exists():
            return _from_external(path / "model.safetensors", model, image_size)
        raise EncoderLoadError(f"no checkpoint in {path} (expected ckpt-*.pt or model.safetensors)")
    if path.suffix == ".safetensors":
        return _from_external(path, model, image_size)
    state = _torch_load(path)
    if isinstance(state, dict) and "config" in state and isinstance(state.get("model"), dict):
        return _from_spcl_state(state, path, image_size)
    return _from_external(path, model, image_size, state)


def _torch_load(path: Path):
    # MAE's checkpoints carry their argparse namespace: allow that one plain type, nothing else.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderLoadError(f"cannot read {path} as a weights-only torch checkpoint "
                               f"({load_error(exc)})") from exc


def _from_spcl_state(state: dict, path: Path, image_size: int | None) -> LoadedEncoder:
    config = state.get("config")
    weights = state.get("model")
    if not isinstance(config, dict) or not isinstance(weights, dict):
        raise EncoderLoadError(f"{path} is not an spcl_fast checkpoint (no model/config)")
    enc_state = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    if "patch_embed.proj.weight" not in enc_state:
        raise EncoderLoadError(f"{path}: the checkpoint's model has no encoder.* weights")
    config = run_config(config, path)
    trained_size = config.data.image_size
    size = image_size or trained_size
    encoder = build_encoder(config.model, size)
    notes = []
    if size != trained_size:
        grid = encoder.patch_embed.grid_size
        kind = config.model.pos_embed
        if kind in ("sincos", "none"):
            # Fixed embeddings: training at this size would have used exactly these.
            enc_state["pos_embed"] = encoder.pos_embed.detach().clone()
            notes.append(f"{kind} position embeddings regenerated for a {grid}x{grid} grid")
        else:
            enc_state["pos_embed"] = _resized(enc_state["pos_embed"], grid, path)
            notes.append(f"learned position embeddings resized to a {grid}x{grid} grid")
    encoder.load_state_dict(enc_state)
    # Before checkpoints recorded their statistics the engine always used the synthetic ones.
    stats = _stats(state.get("intensity_stats")) or (synthetic.MEAN, synthetic.STD)
    return LoadedEncoder(encoder, "spcl", str(path), config.data.normalize, config, notes,
                         stats)


# --------------------------------------------------------------------------- external weights


def _from_external(path: Path, model: str | None, image_size: int | None,
                   state=None) -> LoadedEncoder:
    side = {}
    config_json = path.parent / "config.json"
    if config_json.exists():
        side = json.loads(config_json.read_text())
    if state is None:
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise EncoderLoadError("reading .safetensors needs `pip install safetensors`") from exc
        state = load_file(str(path))
    kind = "export" if side.get("format") == "spcl_fast-timm-vit" else "timm"
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        kind = "mae" if kind == "timm" else kind
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderLoadError(f"{path} is not a ViT state dict (expected tensors by name)")
    if any(k.startswith("decoder_") or k == "mask_token" for k in state):
        kind = "mae"
    # Our own export of a class-token encoder pools by that token: keep it (any other
    # checkpoint's class token is dropped and its patch tokens are mean-pooled).
    class_token = kind == "export" and side.get("timm_kwargs", {}).get("class_token", False)
    cls_token = state.get("cls_token") if class_token else None
    if class_token:
        if cls_token is None:
            raise EncoderLoadError(f"{path}: config.json says class_token but there is no "
                                   f"cls_token tensor")
        state = {k: v for k, v in state.items() if k != "cls_token"}
    converted, arch, notes = convert_timm_state(state, str(path))
    if class_token:
        converted["cls_token"] = cls_token
    # An export of fixed (sin-cos or no) position embeddings keeps them fixed, as in training.
    spcl_config = run_config(side["spcl_config"], config_json) if side.get("spcl_config") \
        else None
    pos_kind = spcl_config.model.pos_embed if spcl_config is not None else "learned"
    pos_kind = pos_kind if kind == "export" and pos_kind in ("sincos", "none") else "learned"
    heads = side.get("timm_kwargs", {}).get("num_heads") or _heads_for(arch["embed_dim"], model)
    size = image_size or side.get("image_size") or arch["grid"] * arch["patch_size"]
    encoder = VisionTransformer(
        img_size=size, patch_size=arch["patch_size"], in_chans=1, embed_dim=arch["embed_dim"],
        depth=arch["depth"], num_heads=heads, mlp_ratio=arch["mlp_ratio"],
        qkv_bias=arch["qkv_bias"], pos_embed=pos_kind, class_token=class_token,
    )
    grid = encoder.patch_embed.grid_size
    if arch["grid"] != grid and pos_kind != "learned":
        converted["pos_embed"] = encoder.pos_embed.detach().clone()
        notes.append(f"{pos_kind} position embeddings regenerated for a {grid}x{grid} grid")
    elif arch["grid"] != grid:
        converted["pos_embed"] = _resized(converted["pos_embed"], grid, path)
        notes.append(f"position embeddings resized from {arch['grid']}x{arch['grid']} to "
                     f"{grid}x{grid}")
    encoder.load_state_dict(converted)
    normalize = side.get("normalize", EXTERNAL_NORMALIZE)
    stats = _stats([side["mean"], side["std"]]) if side.get("mean") is not None else None
    return LoadedEncoder(encoder, kind, str(path), normalize, spcl_config, notes, stats)


def _resized(pos: torch.Tensor, grid: int, path: Path) -> torch.Tensor:
    try:
        return resize_pos_embed(pos, grid, str(path))
    except ValueError as exc:
        raise EncoderLoadError(str(exc)) from None


def _heads_for(embed_dim: int, model: str | None) -> int:
    if model is not None:
        if model not in PRESETS:
            raise EncoderLoadError(f"unknown --model {model!r}; choose from {sorted(PRESETS)}")
        preset = PRESETS[model]
        if preset["embed_dim"] != embed_dim:
            raise EncoderLoadError(
                f"--model {model} has width {preset['embed_dim']} but the weights have {embed_dim}"
            )
        return preset["num_heads"]
    if embed_dim in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[embed_dim]
    if embed_dim % 64 == 0:
        return embed_dim // 64  # timm's convention: 64-dim heads
    raise EncoderLoadError(
        f"cannot tell the number of heads of a width-{embed_dim} ViT; name a --model preset"
    )


def convert_timm_state(state: dict, where: str = "state dict") -> tuple[dict, dict, list[str]]:
    """Map a timm / MAE ViT state dict onto :class:`~spcl_fast.nn.VisionTransformer` names.

    Returns ``(state, arch, notes)``: the converted tensors (``pos_embed`` still on the source
    grid, ``(1, g*g, D)``), the architecture read from the shapes (``embed_dim``, ``depth``,
    ``patch_size``, ``mlp_ratio``, ``qkv_bias``, ``grid``) and what was dropped or changed.
    Raises :class:`EncoderLoadError` for weights this ViT cannot hold (layer scale, q/k norm,
    pre-norm, non-square grids).

    Example::

        >>> sd = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
        ...                        num_heads=2).state_dict()
        >>> timm_sd = {**sd, "cls_token": torch.zeros(1, 1, 32), "head.weight": torch.zeros(9, 32),
        ...            "pos_embed": torch.cat([torch.zeros(1, 1, 32), sd["pos_embed"]], 1),
        ...            "patch_embed.proj.weight": sd["patch_embed.proj.weight"].repeat(1, 3, 1, 1)}
        >>> new, arch, notes = convert_timm_state(timm_sd)
        >>> new["pos_embed"].shape, new["patch_embed.proj.weight"].shape, arch["grid"]
        (torch.Size([1, 16, 32]), torch.Size([32, 1, 8, 8]), 4)
    """
    state = dict(state)
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state:
        sample = ", ".join(list(state)[:5])
        raise EncoderLoadError(
            f"{where} is not a ViT checkpoint: no patch_embed.proj.weight (keys: {sample}, ...)"
        )
    notes = []
    if "fc_norm.weight" in state and "norm.weight" not in state:
        # A global-pool fine-tuned ViT normalises the pooled vector; the nearest this encoder
        # has is the per-token final norm (not identical: LayerNorm does not commute with mean).
        state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop(
            "fc_norm.bias")
        notes.append("fc_norm used as the per-token final norm (approximation)")
    dropped = sorted(k for k in state if k.startswith(_DROPPED_PREFIXES))
    if dropped:
        notes.append(f"dropped {len(dropped)} tensors without a counterpart: "
                     f"{', '.join(sorted({k.split('.')[0] for k in dropped}))}")
    state = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}

    w = state["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        raise EncoderLoadError(f"{where}: patch_embed.proj.weight has shape {tuple(w.shape)}")
    if w.shape[1] != 1:
        state["patch_embed.proj.weight"] = w.float().sum(dim=1, keepdim=True).to(w.dtype)
        notes.append(f"{w.shape[1]}-channel patch embedding summed to 1 channel")
    embed_dim, patch = w.shape[0], w.shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise EncoderLoadError(f"{where}: no transformer blocks (blocks.*)")

    if "pos_embed" not in state:
        raise EncoderLoadError(f"{where}: no pos_embed")
    pos = state["pos_embed"]
    pos = pos[None] if pos.dim() == 2 else pos
    rows = pos.shape[1]
    prefix = next((p for p in (0, 1, 2, 5) if _is_square(rows - p)), None)
    if prefix is None:
        raise EncoderLoadError(
            f"{where}: pos_embed has {rows} rows, not a square grid with up to 5 prefix tokens; "
            "it cannot be interpolated"
        )
    if prefix:
        notes.append(f"dropped {prefix} prefix row(s) of pos_embed (class/register tokens)")
    state["pos_embed"] = pos[:, prefix:]

    qkv_bias = "blocks.0.attn.qkv.bias" in state
    unknown = sorted(set(state) - vit_state_keys(depth, qkv_bias))
    if unknown:
        raise EncoderLoadError(
            f"{where}: tensors this plain ViT cannot hold (layer scale, q/k norm, pre-norm?): "
            f"{', '.join(unknown[:8])}"
        )
    arch = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch,
            "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
            "qkv_bias": qkv_bias, "grid": math.isqrt(rows - prefix)}
    return state, arch, notes


def vit_state_keys(depth: int, qkv_bias: bool = True, class_token: bool = False) -> set[str]:
    """Names in the state dict of :class:`~spcl_fast.nn.VisionTransformer` (= timm's
    ``VisionTransformer(class_token=False, global_pool="avg", fc_norm=False, num_classes=0)``,
    or with ``class_token``: ``class_token=True, no_embed_class=True, global_pool="token"``).
    """
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias"} | ({"cls_token"} if class_token else set())
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"] + (["attn.qkv.bias"] if qkv_bias else [])
    return keys | {f"blocks.{i}.{n}" for i in range(depth) for n in per_block}


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def set_drop_path(encoder: VisionTransformer, rate: float) -> None:
    """Stochastic depth for fine-tuning: ``rate`` rising linearly to the last block (as the
    ViT's own ``drop_path_rate``), set on an already-built encoder."""
    depth = len(encoder.blocks)
    for i, blk in enumerate(encoder.blocks):
        blk.drop_path.p = rate * i / max(depth - 1, 1)

