"""Pure-PyTorch InfoNCE: the ground truth for tests.

It materialises the full similarity matrix, so it is for tests and small batches only; the op in
``spcl_fast.ops.info_nce`` streams over blocks instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVES = ("cross", "all")


def info_nce_ref(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    symmetric: bool = True,
    negatives: str = "cross",
) -> torch.Tensor:
    """Mean InfoNCE loss of the pairs ``(z_a[i], z_b[i])``; scalar in the input dtype.

    Rows are L2-normalised first. ``negatives="cross"``: the logits of query ``z_a[i]`` are
    ``z_a[i] . z_b[j] / temperature`` over all ``j`` (CLIP's M x M matrix); with ``symmetric``
    the loss averages this with the ``z_b -> z_a`` direction. ``negatives="all"``: SimCLR's
    NT-Xent over the 2M x 2M matrix of ``cat(z_a, z_b)`` without self-similarities; with
    ``symmetric`` every one of the 2M rows is a query, without it only ``z_a``'s M rows.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"info_nce_ref: negatives must be one of {NEGATIVES}, got {negatives!r}")
    a = F.normalize(z_a, dim=-1)
    b = F.normalize(z_b, dim=-1)
    m = a.shape[0]
    target = torch.arange(m, device=a.device)
    if negatives == "cross":
        logits = a @ b.T / temperature
        loss = F.cross_entropy(logits, target)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss
    z = torch.cat([a, b])
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * m, dtype=torch.bool, device=a.device), float("-inf"))
    targets = torch.cat([target + m, target])
    if not symmetric:
        return F.cross_entropy(logits[:m], targets[:m])
    return F.cross_entropy(logits, targets)
