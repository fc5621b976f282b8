"""Training FLOPs per image of each method at ViT-S/B/L: the counting behind the README's table.

:func:`flops_table` counts S-PCL (and its variants), MAE and DINO, each by the method's own
``train_flops`` on an encoder built on the meta device. The command that prints the table, with
the default recipe the presets train in its own row, is ``python -m spcl_fast.run.flops_table``
(:mod:`spcl_fast.run.flops_table`: the presets live above this layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn import create_vit
from . import build_method

MODEL_LABELS = {
    "vit_tiny_patch16": "ViT-Ti/16",
    "vit_small_patch16": "ViT-S/16",
    "vit_base_patch16": "ViT-B/16",
    "vit_large_patch16": "ViT-L/16",
}
TABLE_MODELS = ("vit_small_patch16", "vit_base_patch16", "vit_large_patch16")

# (method, variant label, method keyword arguments). S-PCL variants change only token counts;
# ``block_size`` changes which tokens, not how many, so it costs what the 50/50 split costs.
VARIANTS: tuple[tuple[str, str, dict], ...] = (
    ("spcl", "50/50 split", {}),
    ("spcl", "ratio in [0.3, 0.7]", {"ratio_range": (0.3, 0.7)}),
    ("spcl", "keep 0.5 (two 25% subsets)", {"keep": 0.5}),
    ("spcl", "2x2 block partitions", {"block_size": 2}),
    ("mae", "75% masked, decoder 8x512", {}),
    ("dino", "2 global + 10 local crops", {}),
)


def method_train_flops(
    method: str,
    model: str = "vit_base_patch16",
    image_size: int = 224,
    patch_size: int = 16,
    batch_size: int = 256,
    seed: int = 0,
    **kwargs,
) -> float:
    """Training FLOPs per image of one step of ``method`` (``"spcl"|"mae"|"dino"``) on an
    encoder preset: forward + backward of everything trained, forward of teachers, the loss's
    matmuls. Built on the meta device (no memory, no init cost) and counted by the method's own
    ``train_flops``; random token counts (``ratio_range``) average over ``batch_size`` images.

    Args:
        method: ``"spcl"``, ``"mae"`` or ``"dino"``.
        model: a ``spcl_fast.nn`` preset name.
        image_size, patch_size: encoder geometry.
        batch_size: images in the step the plan is drawn for.
        seed: seed of the plan's generator.
        **kwargs: the method's keyword arguments (e.g. ``keep=0.5``, ``ratio_range=(lo, hi)``).

    Returns:
        training FLOPs per image, a float.

    Example::

        >>> round(method_train_flops("spcl", "vit_base_patch16") / 1e9, 1)
        102.5
    """
    with torch.device("meta"):
        encoder = create_vit(model, img_size=image_size, patch_size=patch_size)
        net = build_method(method, encoder, **kwargs)
    plan = net.sample_plan(batch_size, torch.Generator().manual_seed(seed), "cpu")
    return net.train_flops(plan) / batch_size


def flops_table(
    models: Sequence[str] = TABLE_MODELS,
    image_size: int = 224,
    variants: Sequence[tuple[str, str, dict]] = VARIANTS,
) -> list[dict]:
    """One record per (variant, model): ``method``, ``variant``, ``model``, ``model_name``,
    ``image_size``, ``gflops`` (2 x MAC), ``gmacs`` and ``vs_spcl`` (ratio to the first S-PCL
    variant of the same model).

    Args:
        models: ``spcl_fast.nn`` preset names (patch 16).
        image_size: image side in pixels.
        variants: ``(method, label, method kwargs)`` triples, as in :data:`VARIANTS`.

    Example::

        >>> recs = flops_table(["vit_small_patch16"], image_size=64,
        ...                    variants=[VARIANTS[0], VARIANTS[2]])
        >>> [(r["variant"], r["gflops"], r["vs_spcl"]) for r in recs]
        [('50/50 split', 2.056, 1.0), ('keep 0.5 (two 25% subsets)', 1.031, 0.501)]
    """
    records = []
    for model in models:
        base = None
        for method, variant, kwargs in variants:
            gflops = method_train_flops(method, model, image_size, **kwargs) / 1e9
            base = base if base is not None or method != "spcl" else gflops
            records.append({
                "method": method, "variant": variant, "model": MODEL_LABELS.get(model, model),
                "model_name": model, "image_size": image_size, "gflops": round(gflops, 3),
                "gmacs": round(gflops / 2, 3),
                "vs_spcl": round(gflops / base, 3) if base else None,
            })
    return records


def format_table(records: list[dict]) -> str:
    """Rows = method variants, columns = models, cells = ``GFLOPs (GMACs) xRatio`` per image.

    Args:
        records: dicts with ``method``, ``variant``, ``model``, ``gflops``, ``gmacs`` and
            ``vs_spcl``, as :func:`flops_table` returns.

    Returns:
        the table as one string.

    Example::

        >>> recs = [dict(method="spcl", variant="50/50 split", model="ViT-S/16", gflops=26.3,
        ...              gmacs=13.15, vs_spcl=1.0)]
        >>> print(format_table(recs))
        method  variant                                   ViT-S/16
        ----------------------------------------------------------
        spcl    50/50 split                      26.3 (13.2) x1.00
    """
    models = list(dict.fromkeys(r["model"] for r in records))
    rows = list(dict.fromkeys((r["method"], r["variant"]) for r in records))
    cell = {(r["method"], r["variant"], r["model"]): r for r in records}
    width = max(28, *(len(v) for _, v in rows))
    head = f"{'method':<7} {'variant':<{width}}" + "".join(f"{m:>22}" for m in models)
    lines = [head, "-" * len(head)]
    for method, variant in rows:
        cells = []
        for m in models:
            r = cell.get((method, variant, m))
            cells.append(f"{r['gflops']:>9.1f} ({r['gmacs']:.1f}) x{r['vs_spcl']:<4.2f}" if r
                         else f"{'-':>22}")
        lines.append(f"{method:<7} {variant:<{width}}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
