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
* :func:`multi_positive_nce`: InfoNCE in which every row of the same group (another film of
  the same patient) is a positive too (SupCon, Khosla et al., NeurIPS 2020).

Plain torch: the ``(M, M)`` matrices of :func:`bounded_info_nce` and :func:`multi_positive_nce`
are materialised (batches here are thousands of rows at most); autograd gives the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import collectives


def bounded_similarity(cos: torch.Tensor, temperature: float, kappa: float) -> torch.Tensor:
    """OCL's logit of a cosine ``cos`` (any shape): ``0.5 (1 + cos) / (1 + kappa (1 - cos)) /
    temperature``; ``kappa = 0`` is the affine map ``(1 + cos) / (2 temperature)``."""
    return 0.5 * (1 + cos) / (1 + kappa * (1 - cos)) / temperature


def bounded_info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.07,
                     kappa: float = 1 / 64, symmetric: bool = True,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE of the pairs ``(z_a[i], z_b[i])`` over the other view's rows (CLIP's
    ``cross`` negatives) with :func:`bounded_similarity` logits.

    Args:
        z_a, z_b: ``(M, d)`` float, row ``i`` of each a positive pair; L2-normalised inside.
        temperature, kappa: the bounded similarity's ``tau`` (OCL: 0.07) and ``kappa`` (1/64).
        symmetric: average the ``a -> b`` and ``b -> a`` cross-entropies (OCL does).
        groups: optional ``(M,)`` integer ids (the patient of each pair): rows ``i != j`` of
            one id are no negatives of each other, as :func:`spcl_fast.info_nce`'s ``groups``.

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
    if groups is not None:  # symmetric in i and j: the same mask serves logits.T
        same = (groups[:, None] == groups[None, :]) & (target[:, None] != target[None, :])
        logits = logits.masked_fill(same, float("-inf"))
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


def multi_positive_nce(z_a: torch.Tensor, z_b: torch.Tensor, groups: torch.Tensor,
                       temperature: float = 0.1, symmetric: bool = True,
                       negatives: str = "cross", kappa: float | None = None,
                       gather_distributed: bool = False) -> torch.Tensor:
    """InfoNCE whose positives are every candidate of the query's group: SupCon's
    ``L_out`` (Khosla et al., 2020), the mean over the positives of their log-probability.

    Query ``q``'s loss is ``-(1 / |P(q)|) sum_{p in P(q)} log softmax_{k in C(q)} L[q, k]``
    over its candidates ``C(q)`` (the other view's rows for ``"cross"``; both views' rows but
    itself for ``"all"``, as :func:`spcl_fast.info_nce`), ``P(q)`` the candidates whose group
    is ``q``'s: its own pair always, and every view of the other pairs of its group (the other
    films of the patient). With every group a single pair this is plain InfoNCE.

    Why the mean of log-probabilities and not the log of their summed probability (SupCon's
    ``L_in``): the sum is satisfied once any one positive takes the mass, and the own pair
    (two subsets of one film) is far easier than another film of the patient, so ``L_in``
    barely pulls the other films together; ``L_out`` pulls every positive alike (and is the
    form SupCon found to train better).

    Args:
        z_a, z_b: ``(M, d)`` float, row ``i`` of each a positive pair; L2-normalised inside.
        groups: ``(M,)`` integer ids, one per pair (the patient of each film).
        temperature: logits are ``cos / temperature``; with ``kappa`` OCL's
            :func:`bounded_similarity` instead.
        symmetric, negatives: as :func:`spcl_fast.info_nce` (``"cross"``: average both
            directions; ``"all"``: all ``2M`` rows are queries, else ``z_a``'s only).
        gather_distributed: inside a process group, every process's rows (and ids) are
            candidates, gathered with gradient, as :func:`spcl_fast.info_nce`'s; the result is
            the mean over the local queries (``groups`` must be global ids).

    Returns:
        scalar ``()`` tensor, the mean over the queries, differentiable in ``z_a``, ``z_b``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> z_a, z_b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
        >>> distinct = torch.arange(6)
        >>> from spcl_fast.reference import info_nce_ref
        >>> bool(torch.isclose(multi_positive_nce(z_a, z_b, distinct), info_nce_ref(z_a, z_b)))
        True
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"multi_positive_nce: z_a and z_b must be (M, d) of one shape, got "
                         f"{tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if groups.shape != z_a.shape[:1] or groups.is_floating_point():
        raise ValueError(f"multi_positive_nce: groups must be ({z_a.shape[0]},) integer ids, "
                         f"got {tuple(groups.shape)} {groups.dtype}")
    if negatives not in ("cross", "all"):
        raise ValueError(f"multi_positive_nce: negatives must be 'cross' or 'all', got "
                         f"{negatives!r}")
    m = z_a.shape[0]
    world, rank = (collectives.world_size(), collectives.rank()) if gather_distributed else (1, 0)
    a, b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)

    def gathered(x):  # every process's rows, rank-major (ids without gradient)
        return x if world == 1 else collectives.all_gather_with_grad(x)

    def rows(queries, keys, query_ids, key_ids, self_index=None):
        cos = queries @ keys.T
        logits = cos / temperature if kappa is None else bounded_similarity(cos, temperature,
                                                                            kappa)
        positive = query_ids[:, None] == key_ids[None, :]
        if self_index is not None:  # a row is no candidate of itself
            own = torch.arange(keys.shape[0], device=keys.device) == self_index[:, None]
            logits = logits.masked_fill(own, float("-inf"))
            positive = positive & ~own
        log_prob = logits.log_softmax(dim=-1)
        return -(torch.where(positive, log_prob, 0.0).sum(dim=1) / positive.sum(dim=1)).mean()

    if negatives == "cross":
        key_ids = gathered(groups)
        loss = rows(a, gathered(b), groups, key_ids)
        if symmetric:
            loss = 0.5 * (loss + rows(b, gathered(a), groups, key_ids))
        return loss
    z, ids = torch.cat([a, b]), torch.cat([groups, groups])
    queries = z if symmetric else a
    self_index = rank * 2 * m + torch.arange(queries.shape[0], device=z.device)
    return rows(queries, gathered(z), ids[:queries.shape[0]], gathered(ids), self_index)
