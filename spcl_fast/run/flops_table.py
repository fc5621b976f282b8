"""``python -m spcl_fast.run.flops_table [--json] [--image-size S] [--models NAME ...]``: the
training FLOPs per image of plain S-PCL (and its variants), of the default recipe that the
presets train, of MAE and of DINO at ViT-S/B/L.

The counting is :mod:`spcl_fast.methods.train_flops` (each method built on the meta device and
counted by its own ``train_flops``); this layer adds the recipe's row, read from the presets'
config so that it follows the presets.

Example::

    >>> method, label, settings = recipe_variant()
    >>> method, label, settings["keep"], settings["intra_weight"]
    ('spcl', 'default: keep 0.5, intra-image term', 0.5, 1.0)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from ..cli import ArgumentParser
from ..methods.train_flops import MODEL_LABELS, TABLE_MODELS, VARIANTS, flops_table, format_table
from .presets import PRESETS

# The demo and every ``vit_*`` preset train this preset's method section (tests/test_flops.py).
RECIPE_PRESET = "vit_base_224"


def recipe_variant() -> tuple[str, str, dict]:
    """The default recipe as a table variant ``(method, label, method settings)``: the method
    and the whole method section of :data:`RECIPE_PRESET`; the label names its token budget and
    whether the intra-image term (its predictor) is on."""
    config = PRESETS[RECIPE_PRESET]()
    settings = dataclasses.asdict(config.method_section)
    label = f"default: keep {settings['keep']:g}"
    if settings.get("intra_weight", 0) > 0:
        label += ", intra-image term"
    return config.method, label, settings


def table_variants() -> tuple[tuple[str, str, dict], ...]:
    """:data:`~spcl_fast.methods.train_flops.VARIANTS` with the default recipe's row after the
    plain S-PCL rows."""
    spcl = tuple(v for v in VARIANTS if v[0] == "spcl")
    return (*spcl, recipe_variant(), *(v for v in VARIANTS if v[0] != "spcl"))


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """The command line.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        the records of :func:`~spcl_fast.methods.train_flops.flops_table` over
        :func:`table_variants`, also printed (a table, or JSON with ``--json``).

    Example::

        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     recs = main(["--json", "--image-size", "64", "--models", "vit_small_patch16"])
        >>> len(recs), recs[0]["gflops"], json.loads(out.getvalue()) == recs
        (7, 2.056, True)
    """
    parser = ArgumentParser(
        prog="python -m spcl_fast.run.flops_table",
        description="Training FLOPs per image of plain S-PCL (and variants), the default "
                    "recipe, MAE and DINO.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of records")
    parser.add_argument("--image-size", type=int, default=224,
                        help="image side in pixels, a multiple of the patch size 16")
    parser.add_argument("--img-size", type=int, help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--models", nargs="+", default=list(TABLE_MODELS),
                        choices=sorted(MODEL_LABELS), help="encoder presets (patch 16)")
    args = parser.parse_args(argv)
    if args.img_size is not None:
        parser.error(f"--img-size is now --image-size (as in train): use --image-size "
                     f"{args.img_size}")
    if args.image_size < 16 or args.image_size % 16:
        parser.error(f"--image-size must be a positive multiple of the patch size 16, got "
                     f"{args.image_size}")
    records = flops_table(args.models, args.image_size, table_variants())
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"Training FLOPs per image at {args.image_size}x{args.image_size}, 1-channel "
              f"input: GFLOPs (GMACs) xRatio-to-S-PCL-50/50.\nCounted: forward + backward of "
              f"trained layers, teacher forwards, loss matmuls; matmul/conv/attention only "
              f"(FLOP = 2 x MAC; norms, activations, softmax excluded).")
        print(format_table(records))
    return records


if __name__ == "__main__":
    main()
