"""Loss terms of the methods that the fused ``spcl_fast.info_nce`` does not cover.

* :func:`bounded_info_nce`: InfoNCE whose logits are OCL's bounded similarity
  (Yang et al., ICML 2025, "One Leaf Reveals the Season"), ``0.5 (1 + c) / (1 + kappa (1 - c))
  / tau`` of the cosine ``c``: in ``[0, 1/tau]``, flatter than ``c / tau`` for dissimilar pairs,
  so far negatives stop pushing.
* :func:`vicreg_variance`, :func:`vicreg_covariance`: VICReg's (Bardes et al., ICLR 2022)
  anti-collapse terms on one branch's embeddings, beside a contrastive loss.
* :func:`intra_image_nce`: InfoNCE between predicted and actual token representations whose
  negatives are the other queried tokens of the same image (ConMIM, Yi et al., ICLR 2023;
  Siamese Image Modeling, Tao et al., CVPR 2023), so image-level cues (exposure, pose, body
  size) cannot tell the positive from the negatives.

Plain torch: the ``(M, M)`` matrix of :func:`bounded_info_nce` is materialised (batches here
are thousands of rows at most); autograd gives the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bounded_similarity(cos: torch.Tensor, temperature: float, kappa: float) -> torch.Tensor:
    """OCL's logit of a cosine ``cos`` (any shape): ``0.5 (1 + cos) / (1 + kappa (1 - cos)) /
    temperature``; ``kappa = 0`` is the affine map ``(1 + cos) / (2 temperature)``."""
    return 0.5 * (1 + cos) / (1 + kappa * (1 - cos)) / temperature


def bounded_info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.07,
                     kappa: float = 1 / 64, symmetric: bool = True) -> torch.Tensor:
    """Mean InfoNCE of the pairs ``(z_a[i], z_b[i])`` over the other view's rows (CLIP's
    ``cross`` negatives) with :func:`bounded_similarity` logits.

    Args:
        z_a, z_b: ``(M, d)`` float, row ``i`` of each a positive pair; L2-normalised inside.
        temperature, kappa: the bounded similarity's ``tau`` (OCL: 0.07) and ``kappa`` (1/64).
        symmetric: average the ``a -> b`` and ``b -> a`` cross-entropies (OCL does).

    Returns:
        scalar ``()`` tensor in the inputs' dtype, differentiable.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> z_a = torch.randn(8, 16, generator=g)
        >>> near, far = z_a + 0.1 * torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
        >>> bool(bounded_info_nce(z_a, near) < bounded_info_nce(z_a, far))
        True
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"bounded_info_nce: z_a and z_b must be (M, d) of one shape, got "
                         f"{tuple(z_a.shape)} and {tuple(z_b.shape)}")
    cos = F.normalize(z_a, dim=-1) @ F.normalize(z_b, dim=-1).T
    logits = bounded_similarity(cos, temperature, kappa)
    target = torch.arange(z_a.shape[0], device=z_a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def vicreg_variance(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance hinge: ``mean_j relu(1 - sqrt(Var_i z[i, j] + eps))`` over the ``d``
    features of ``z (M, d)`` (unbiased variance over the ``M >= 2`` rows); 0 once every
    feature's std reaches 1."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"vicreg_variance needs (M, d) with M >= 2 rows, got {tuple(z.shape)}")
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance term: the sum of the squared off-diagonal entries of the ``(d, d)``
    covariance of ``z (M, d)`` (unbiased, over ``M >= 2`` rows), divided by ``d``."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"vicreg_covariance needs (M, d) with M >= 2 rows, got {tuple(z.shape)}")
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (z.shape[0] - 1)
    return (cov.square().sum() - cov.diagonal().square().sum()) / z.shape[1]


def intra_image_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each prediction picking its own target among the queried targets
    of its own image (one direction: predictions are the queries, targets the keys).

    Args:
        pred, target: ``(B, q, d)`` float; ``pred[b, i]`` predicts ``target[b, i]``, the other
            ``target[b, j]`` are its negatives; L2-normalised inside.
        temperature: logits are ``cos / temperature``.
        valid: optional ``(B, q)`` bool; a ``False`` query is neither a query nor a negative
            (an image with fewer than ``q`` tokens to query pads with them). ``None``: all.

    Returns:
        scalar ``()`` tensor, the mean over valid queries (0 when there are none),
        differentiable in ``pred`` and ``target``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> target = torch.randn(2, 8, 16, generator=g)
        >>> near = target + 0.1 * torch.randn(2, 8, 16, generator=g)
        >>> bool(intra_image_nce(near, target) < intra_image_nce(near.flip(1), target))
        True
    """
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"intra_image_nce: pred and target must be (B, q, d) of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if valid is None:
        valid = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
    elif valid.shape != pred.shape[:2] or valid.dtype != torch.bool:
        raise ValueError(f"intra_image_nce: valid must be a {tuple(pred.shape[:2])} bool "
                         f"tensor, got {tuple(valid.shape)} {valid.dtype}")
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).transpose(1, 2)
    logits = (logits / temperature).masked_fill(~valid[:, None, :], float("-inf"))
    # an invalid query row may be all -inf: give it a finite row, then weigh it 0
    logits = logits.masked_fill(~valid[:, :, None], 0.0)
    loss = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=1, dim2=2)  # (B, q)
    loss = torch.where(valid, loss, 0.0)
    return loss.sum() / valid.sum().clamp(min=1)
