"""Pictures of what S-PCL does to an X-ray.

``python -m spcl_fast.viz partition --image X [--checkpoint C] --out P.png``
    the image with its token subsets coloured (A orange, B blue, further subsets of
    ``num_subsets > 2`` in other colours; tokens in none, when ``keep < 1``, left uncoloured),
    drawn with the run's partition settings (ratio, keep, block size, subsets) or the training
    defaults.

``python -m spcl_fast.viz attention --checkpoint C --image X --out P.png``
    for each subset, the attention its tokens receive in the encoder's last block when the
    subset is encoded on its own (as in training): softmax attention probabilities of the last
    block, averaged over heads and over the subset's queries, one value per key token, upsampled
    bilinearly to the image. It is computed with plain PyTorch (each subset is a dense sequence,
    which is exactly what the varlen kernel computes per segment), never with the Triton kernel.

``X`` is an image file (PNG/JPEG/DICOM through the data package's reader, fitted to the square
as datasets are; Pillow for PNG/JPEG where that reader is absent) or ``synthetic:<index>`` (that
image of the built-in synthetic test split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cli import THREADS_HELP, ArgumentParser, positive_int, set_threads
from .partition import sample_partitions
from .run.config import TrainConfig
from .run.presets import demo

# subset k's colour and name: A orange, B blue, then green, purple, red, brown, pink, grey
COLOURS = [(1.0, 0.55, 0.0), (0.12, 0.47, 1.0), (0.17, 0.63, 0.17), (0.58, 0.4, 0.74),
           (0.84, 0.15, 0.16), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5)]
COLOUR_NAMES = ["orange", "blue", "green", "purple", "red", "brown", "pink", "grey"]


def subset_name(k: int) -> str:
    return chr(ord("A") + k)


def _legend(num_subsets: int) -> str:
    """Which colour is which subset, as the overlay draws them."""
    return ", ".join(f"{subset_name(k)} {COLOUR_NAMES[k % len(COLOUR_NAMES)]}"
                     for k in range(num_subsets))


def load_image(spec: str, image_size: int) -> torch.Tensor:
    """``(1, S, S)`` float32 in [0, 1] from a file path or ``synthetic:<index>``.

    Example::

        >>> load_image("synthetic:3", 64).shape
        torch.Size([1, 64, 64])
    """
    if spec.startswith("synthetic:"):
        from .data import SyntheticCXR

        index = spec.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"--image synthetic:<index> takes a whole number >= 0, got {spec!r}")
        index = int(index)
        return SyntheticCXR("test", num_images=index + 1, image_size=image_size)[index]["image"]
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    try:  # the data package's reader: DICOM done right, and its square-fitting policy
        from .data import fit_square, read_image
    except ImportError:
        read_image = None
    if read_image is not None:
        return torch.from_numpy(fit_square(read_image(path), image_size))[None]
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:  # RGB(A) files of grey images: average the colour channels
        arr = arr[..., :3].mean(-1)
    scale = 65535.0 if arr.dtype == np.uint16 or arr.max() > 255 else 255.0
    img = torch.as_tensor(arr.astype(np.float32) / scale)
    img = img.reshape(1, 1, *img.shape[-2:])
    if img.shape[-2:] != (image_size, image_size):
        img = F.interpolate(img, size=(image_size, image_size), mode="area"
                            if img.shape[-1] > image_size else "bilinear")
    return img[0].clamp(0, 1)


def partition_grid(config: TrainConfig, grid: int, seed: int = 0) -> torch.Tensor:
    """``(grid, grid)`` int64: ``k + 1`` for subset ``k`` (1: A, 2: B, ...), 0 for none, drawn
    with the partition settings of ``config`` for one image."""
    spcl = config.spcl
    plan = sample_partitions(
        1, grid * grid, ratio=spcl.ratio, ratio_range=spcl.ratio_range, keep=spcl.keep,
        generator=torch.Generator().manual_seed(seed), block_size=spcl.block_size,
        shared=spcl.shared_split, num_subsets=spcl.num_subsets,
    )
    labels = torch.zeros(grid * grid, dtype=torch.int64)
    labels[plan.token_index] = plan.segment_ids() + 1
    return labels.reshape(grid, grid)


@torch.no_grad()
def subset_attention(encoder, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention received by each token of a subset in the last block, ``(n,)`` summing to 1.

    ``image`` is one normalised ``(1, 1, S, S)`` input, ``tokens`` the subset's token indices.
    The subset runs through the blocks as one dense sequence (what partition attention computes
    for its segment); in the last block the softmax probabilities are averaged over heads and
    queries.
    """
    encoder.eval()
    x = encoder.embed(image)[:, tokens]
    prefix = encoder.num_prefix_tokens
    if prefix:  # the subset's own class token, as in forward_partitioned
        x = torch.cat([encoder.cls_token.to(x.dtype), x], dim=1)
    for blk in encoder.blocks[:-1]:
        x = blk(x)
    last = encoder.blocks[-1]
    attn = last.attn
    h = last.norm1(x)
    n = h.shape[1]
    qkv = attn.qkv(h).view(1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    probs = (qkv[0] @ qkv[1].transpose(-1, -2) * attn.head_dim**-0.5).softmax(-1)
    received = probs[0].mean(dim=(0, 1))[prefix:]  # by the patch tokens (not the class token)
    return received / received.sum()


def _show(ax, image: torch.Tensor, title: str) -> None:
    ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _overlay(ax, labels: torch.Tensor, size: int, alpha: float = 0.45) -> None:
    grid = labels.shape[0]
    rgba = np.zeros((grid, grid, 4), dtype=np.float32)
    for k in range(int(labels.max())):
        mask = (labels == k + 1).numpy()
        rgba[mask, :3] = COLOURS[k % len(COLOURS)]
        rgba[mask, 3] = alpha
    ax.imshow(rgba, extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
    step = size / grid
    for k in range(1, grid):
        ax.axhline(k * step - 0.5, color="white", lw=0.3, alpha=0.4)
        ax.axvline(k * step - 0.5, color="white", lw=0.3, alpha=0.4)


def _settings(checkpoint: str | None, image_size: int | None, patch_size: int | None):
    """(encoder or None, train config, normaliser) for the command line's choices."""
    if checkpoint is None:
        changes = {k: v for k, v in (("image_size", image_size), ("patch_size", patch_size))
                   if v is not None}
        config = demo().replace(**changes)  # what a plain training run uses
        size, patch = config.data.image_size, config.model.patch_size
        if patch < 1 or size % patch:
            raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
        return None, config, None
    if patch_size is not None:
        raise ValueError("--patch-size comes from the checkpoint; leave it out with "
                         "--checkpoint")
    from .eval.encoders import load_encoder

    loaded = load_encoder(checkpoint, image_size=image_size)
    config = (loaded.config or TrainConfig()).replace(
        image_size=loaded.image_size, patch_size=loaded.encoder.patch_embed.patch_size)
    return loaded.encoder, config, loaded.transform()


def draw_partition(image_spec: str, out: str | Path, checkpoint: str | None = None,
                   image_size: int | None = None, patch_size: int | None = None,
                   seed: int = 0) -> Path:
    """Save the partition picture (see the module docstring); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, config, _ = _settings(checkpoint, image_size, patch_size)
    size, spcl = config.data.image_size, config.spcl
    image = load_image(image_spec, size)
    labels = partition_grid(config, size // config.model.patch_size, seed)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.8), dpi=120)
    _show(axes[0], image, Path(image_spec).name)
    sizes = [int((labels == k + 1).sum()) for k in range(spcl.num_subsets)]
    _show(axes[1], image, "tokens per subset: " + ", ".join(
        f"{subset_name(k)} {n}" for k, n in enumerate(sizes)))
    _overlay(axes[1], labels, size)
    split = f"{spcl.num_subsets} subsets" if spcl.num_subsets > 2 else f"ratio {spcl.ratio}"
    fig.suptitle(f"S-PCL partition: {config.model.patch_size}px patches, {split}, keep "
                 f"{spcl.keep}, block {spcl.block_size} ({_legend(spcl.num_subsets)})",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, out, plt)


def draw_attention(image_spec: str, checkpoint: str, out: str | Path,
                   image_size: int | None = None, seed: int = 0) -> Path:
    """Save the attention picture (see the module docstring); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder, config, transform = _settings(checkpoint, image_size, None)
    size = config.data.image_size
    grid = size // config.model.patch_size
    image = load_image(image_spec, size)
    labels = partition_grid(config, grid, seed).flatten()
    x = transform(image[None])
    k = config.spcl.num_subsets
    fig, axes = plt.subplots(1, 1 + k, figsize=(3.4 * (1 + k), 3.8), dpi=120)
    _show(axes[0], image, Path(image_spec).name)
    _overlay(axes[0], labels.reshape(grid, grid), size)
    for ax, value in zip(axes[1:], range(1, k + 1), strict=True):
        name = subset_name(value - 1)
        tokens = (labels == value).nonzero().flatten()
        heat = torch.zeros(grid * grid)
        heat[tokens] = subset_attention(encoder, x, tokens)
        heat = F.interpolate(heat.reshape(1, 1, grid, grid), size=(size, size), mode="bilinear",
                             align_corners=False)[0, 0]
        # Only the subset's own patches carry attention: blank out the others' (NaN is drawn
        # transparent) so the bilinear spill-over does not suggest attention that isn't there.
        inside = (labels == value).float().reshape(1, 1, grid, grid)
        inside = F.interpolate(inside, size=(size, size), mode="nearest")[0, 0] > 0
        heat = torch.where(inside, heat, torch.full_like(heat, float("nan")))
        _show(ax, image, f"subset {name}: attention received, last block")
        ax.imshow(heat.numpy(), cmap="inferno", alpha=0.65, interpolation="nearest")
    fig.suptitle(f"{Path(checkpoint).name}: mean over heads and queries of each subset",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out, plt)


def _save(fig, out, plt) -> Path:
    out = Path(out)
    if out.is_dir():
        plt.close(fig)
        raise ValueError(f"--out {out} is a folder; name the PNG to write")
    if not out.suffix:
        out = out.with_name(out.name + ".png")  # what matplotlib would write anyway
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as exc:
        raise ValueError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # matplotlib: a format it does not know
        raise ValueError(f"cannot write {out}: {exc}") from exc
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m spcl_fast.viz", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for what in ("partition", "attention"):
        p = sub.add_parser(what)
        p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
        p.add_argument("--image", required=True, help="image file or synthetic:<index>")
        p.add_argument("--checkpoint", required=what == "attention",
                       help="run folder or checkpoint (partition settings, encoder)")
        p.add_argument("--out", required=True,
                       help="picture to write (.png unless another matplotlib format is named)")
        p.add_argument("--image-size", type=int, default=None)
        p.add_argument("--seed", type=int, default=0, help="seed of the partition draw")
        if what == "partition":
            p.add_argument("--patch-size", type=int, default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(args.threads)
    try:
        if args.what == "partition":
            path = draw_partition(args.image, args.out, args.checkpoint, args.image_size,
                                  args.patch_size, args.seed)
        else:
            path = draw_attention(args.image, args.checkpoint, args.out, args.image_size,
                                  args.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
