"""The learning-rate schedule of every loop here (pre-training, fine-tuning, segmentation)."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps to ``lr``, then cosine decay to ``min_lr`` at
    ``total`` (and ``min_lr`` after it).

    Example::

        >>> lr_at(0, 100, 10, 1e-3), lr_at(9, 100, 10, 1e-3), lr_at(100, 100, 10, 1e-3, 1e-5)
        (0.0001, 0.001, 1e-05)
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
