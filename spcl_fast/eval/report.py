"""What an evaluation run leaves behind: ``results.json``, ROC curves, a printed table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .metrics import auroc, roc_curve


def jsonable(obj):
    """``obj`` with tensors as lists, paths as strings and NaN/inf as ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(path: str | Path, results: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(results), indent=2) + "\n")
    return path


def plot_roc_curves(scores: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                    path: str | Path, title: str = "") -> Path:
    """One ROC curve per class (AUROC in the legend) of ``(n, C)`` test scores and labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=110)
    for c, name in enumerate(class_names):
        fpr, tpr = roc_curve(scores[:, c], labels[:, c])
        if fpr.numel():
            ax.plot(fpr, tpr, lw=1.3, color=plt.cm.tab20(c % 20),  # 14 CXR classes: no repeats
                    label=f"{name} ({auroc(scores[:, c], labels[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC curves (test)")
    ax.legend(fontsize=7, loc="lower right", ncol=2 if len(class_names) > 7 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def auroc_table(result: dict, title: str) -> str:
    """Per-class test (and val) AUROC and the means, as aligned text."""
    per_class = result["per_class_auroc"]
    val = result.get("val_per_class_auroc", {})
    width = max([len(n) for n in per_class] + [12])
    lines = [title, f"  {'class':<{width}}  {'test AUROC':>10}  {'val AUROC':>9}"]
    for name, value in per_class.items():
        lines.append(f"  {name:<{width}}  {_fmt(value):>10}  {_fmt(val.get(name)):>9}")
    lines.append(f"  {'mean':<{width}}  {_fmt(result['mean_auroc']):>10}  "
                 f"{_fmt(result.get('val_mean_auroc')):>9}")
    return "\n".join(lines)


def dice_table(result: dict, title: str) -> str:
    val = result.get("val", {})
    rows = [("Dice, all images (Kaggle)", "dice"), ("Dice, positive images", "dice_positive"),
            ("empty images predicted empty", "dice_empty")]
    lines = [title, f"  {'':<30}  {'test':>7}  {'val':>7}"]
    lines += [f"  {label:<30}  {_fmt(result[k]):>7}  {_fmt(val.get(k)):>7}" for label, k in rows]
    lines.append(f"  test images {result['num_images']} ({result['num_positive']} positive)")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def plot_segment_examples(model, dataset, transform, device, path: str | Path,
                          count: int = 4) -> Path:
    """The first ``count`` test images (positives first) with ground truth (green) and
    predicted (red) mask outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [dataset[i] for i in range(min(len(dataset), 4 * count))]
    items.sort(key=lambda it: -float(it["mask"].sum()))
    items = items[:count]
    x = torch.stack([it["image"] for it in items]).to(device)
    model.eval()
    with torch.no_grad():
        prob = model(transform(x) if transform is not None else x).float().sigmoid().cpu()
    fig, axes = plt.subplots(1, len(items), figsize=(3 * len(items), 3.2), dpi=110, squeeze=False)
    for ax, it, p in zip(axes[0], items, prob, strict=True):
        ax.imshow(it["image"].reshape(it["image"].shape[-2:]).numpy(), cmap="gray", vmin=0, vmax=1)
        gt = it["mask"].reshape(it["mask"].shape[-2:]).float()
        for mask, colour in ((gt, "lime"), (p[0] > 0.5, "red")):
            if mask.any():
                ax.contour(mask.float().numpy(), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(str(it.get("id", ""))[:24], fontsize=7)
        ax.axis("off")
    fig.suptitle("ground truth (green), prediction (red)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
