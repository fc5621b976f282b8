"""Pure-PyTorch InfoNCE: the ground truth for tests and the chunked CPU fallback.

Two implementations of the same maths:

* :func:`info_nce_ref` — materialises the full similarity matrix and lets autograd do the rest.
  Simple enough to trust; O(M^2) memory, so tests and small batches only.
* :func:`info_nce_chunked_fwd` / :func:`info_nce_chunked_bwd` — the fallback the op runs on CPU
  (or with ``impl="torch"``): they stream over column blocks of the similarity matrix, keep
  only ``(Mq, chunk)`` logits alive at a time and recompute them in the backward from the saved
  log-sum-exps, exactly as the Triton kernels in ``spcl_fast.kernels.info_nce`` do. Same
  signatures and outputs as those launchers.

The chunked pair works on one *query/key problem* (the op composes the loss from it):

* ``zq`` ``(Mq, d)`` query rows and ``zk`` ``(Mk, d)`` key rows, both un-normalised; the
  logits are ``L[i, j] = scale * <zq_i/|zq_i|, zk_j/|zk_j|>`` (``F.normalize``'s ``eps``).
* query ``i``'s positive key is ``pos(i) = (i + pos_shift) % pos_mod + key_offset`` and, with
  ``self_mask``, key ``self(i) = i + key_offset`` is excluded from its candidates (NT-Xent).
  With group ids ``groups_q (Mq,)`` and ``groups_k (Mk,)`` (integers), key ``j`` is also
  excluded when ``groups_q[i] == groups_k[j]`` and ``j != pos(i)``: the positive always stays,
  so every query keeps at least one candidate.
* statistics: ``row_lse[i] = logsumexp_j L[i, j]`` over the candidates, ``pos[i] = L[i, pos(i)]``,
  and with ``col_lse`` the column log-sum-exp ``col_lse[j] = logsumexp_i L[i, j]`` (CLIP's
  ``b -> a`` direction; only without ``self_mask``); ``inv_q``/``inv_k`` the inverse row norms.
  All fp32 (fp64 for fp64 inputs).
* backward: given the gradients ``d_row (Mq,)``, ``d_col (Mk,)`` (or empty) and ``d_pos (Mq,)``
  of those statistics, ``dL/dL[i, j] = d_row[i] P[i, j] + d_col[j] Q[i, j] + d_pos[i] [j = pos(i)]``
  with ``P = exp(L - row_lse[:, None])`` and ``Q = exp(L - col_lse[None, :])``, pulled back
  through the logits and the row normalisation to ``dzq``, ``dzk`` in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVES = ("cross", "all")
NORM_EPS = 1e-12  # F.normalize's default
_CHUNK_ELEMENTS = 1 << 22  # logits per chunk by default: 16 MiB of fp32 per (Mq, chunk) temporary


def info_nce_ref(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.1,
    symmetric: bool = True,
    negatives: str = "cross",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of the pairs ``(z_a[i], z_b[i])``; scalar in the input dtype.

    Rows are L2-normalised first. ``negatives="cross"``: the logits of query ``z_a[i]`` are
    ``z_a[i] . z_b[j] / temperature`` over all ``j`` (CLIP's M x M matrix); with ``symmetric``
    the loss averages this with the ``z_b -> z_a`` direction. ``negatives="all"``: SimCLR's
    NT-Xent over the 2M x 2M matrix of ``cat(z_a, z_b)`` without self-similarities; with
    ``symmetric`` every one of the 2M rows is a query, without it only ``z_a``'s M rows.

    ``groups`` (``(M,)`` integer ids, row ``i`` of both views has id ``groups[i]``) removes the
    pairs of rows with the same id from the denominators, except the positive pair itself: with
    ``"cross"``, ``z_b[j]`` is no candidate of ``z_a[i]`` (nor ``z_a[j]`` of ``z_b[i]``) when
    ``j != i`` and ``groups[i] == groups[j]``; with ``"all"``, no row of id ``g`` other than its
    positive is a candidate of a row of id ``g``. A row whose group holds every other row keeps
    only its positive: its loss term is exactly 0, with zero gradient.

    Args:
        z_a, z_b: ``(M, d)`` float, row ``i`` of each a positive pair; un-normalised.
        temperature: logits are cosine similarities divided by it.
        symmetric: average both directions (``"cross"``) or use all 2M queries (``"all"``).
        negatives: ``"cross"`` (CLIP) or ``"all"`` (SimCLR NT-Xent).

    Returns:
        scalar ``()`` tensor in the input dtype, differentiable (autograd).

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> z_a = torch.randn(8, 16, generator=g)
        >>> z_b = z_a + 0.1 * torch.randn(8, 16, generator=g)  # positives close to their pair
        >>> loss = info_nce_ref(z_a, z_b)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> bool(loss < info_nce_ref(z_a, torch.randn(8, 16, generator=g)))  # vs random pairs
        True
        >>> info_nce_ref(z_a, z_b, negatives="all").shape
        torch.Size([])
        >>> same = torch.zeros(8, dtype=torch.long)  # one group: only the positives are left
        >>> info_nce_ref(z_a, z_b, groups=same).item()
        0.0
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"info_nce_ref: negatives must be one of {NEGATIVES}, got {negatives!r}")
    a = F.normalize(z_a, dim=-1)
    b = F.normalize(z_b, dim=-1)
    m = a.shape[0]
    target = torch.arange(m, device=a.device)
    if negatives == "cross":
        logits = a @ b.T / temperature
        if groups is not None:
            logits = logits.masked_fill(_same_group(groups, groups, target), float("-inf"))
        loss = F.cross_entropy(logits, target)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss
    z = torch.cat([a, b])
    logits = z @ z.T / temperature
    targets = torch.cat([target + m, target])
    excluded = torch.eye(2 * m, dtype=torch.bool, device=a.device)
    if groups is not None:
        ids = torch.cat([groups, groups])
        excluded |= _same_group(ids, ids, targets)
    logits = logits.masked_fill(excluded, float("-inf"))
    if not symmetric:
        return F.cross_entropy(logits[:m], targets[:m])
    return F.cross_entropy(logits, targets)


def _same_group(groups_q: torch.Tensor, groups_k: torch.Tensor,
                positive: torch.Tensor) -> torch.Tensor:
    """``(Mq, Mk)`` mask of the pairs that ``groups`` excludes: same id, not the positive
    (``positive[i]``: query ``i``'s positive as an index into ``groups_k``)."""
    cols = torch.arange(groups_k.shape[0], device=groups_k.device)
    return (groups_q[:, None] == groups_k[None, :]) & (cols[None, :] != positive[:, None])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk(num_queries: int, num_keys: int) -> int:
    """Columns per block: about 4M logits per ``(Mq, chunk)`` temporary, at least 16.

    Args:
        num_queries: ``Mq``.
        num_keys: ``Mk``.

    Returns:
        a host int in ``[16, max(Mk, 16)]``.

    Example::

        >>> default_chunk(8, 100), default_chunk(1000, 10 ** 6), default_chunk(10 ** 6, 10 ** 6)
        (100, 4194, 16)
    """
    return max(16, min(max(num_keys, 1), _CHUNK_ELEMENTS // max(num_queries, 1)))


def _inv_norm(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    norm = torch.linalg.vector_norm(z.to(dtype), dim=-1)
    return 1.0 / norm.clamp_min(NORM_EPS)


def _pairing(mq: int, device, key_offset: int, pos_shift: int, pos_mod: int):
    rows = torch.arange(mq, device=device)
    return (rows + pos_shift) % pos_mod + key_offset, rows + key_offset


def info_nce_chunked_fwd(
    zq: torch.Tensor,
    zk: torch.Tensor,
    scale: float,
    key_offset: int = 0,
    pos_shift: int = 0,
    pos_mod: int | None = None,
    self_mask: bool = False,
    col_lse: bool = False,
    groups_q: torch.Tensor | None = None,
    groups_k: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of one query/key problem (module docstring), streamed over key blocks.

    Args:
        zq: ``(Mq, d)`` float query rows; ``zk``: ``(Mk, d)`` key rows, same dtype.
        scale: logit scale (``1 / temperature``).
        key_offset, pos_shift, pos_mod: the positive key of query ``i`` is
            ``(i + pos_shift) % pos_mod + key_offset`` (``pos_mod`` defaults to ``Mq``).
        self_mask: exclude key ``i + key_offset`` from query ``i``'s candidates (NT-Xent).
        col_lse: also return the column log-sum-exps (not with ``self_mask``).
        groups_q, groups_k: ``(Mq,)`` and ``(Mk,)`` integer ids, both or neither: key ``j`` is
            no candidate of query ``i`` when their ids are equal and ``j != pos(i)``.
        chunk: key columns per block (default :func:`default_chunk`).

    Returns ``(row_lse (Mq,), pos (Mq,), col_lse (Mk,) or (0,), inv_q (Mq,), inv_k (Mk,))``,
    fp32 (fp64 for fp64 inputs). Peak extra memory is a few ``(Mq, chunk)`` blocks plus
    ``O((Mq + Mk) d)``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> z_a = torch.randn(8, 16, generator=g)
        >>> z_b = z_a + torch.randn(8, 16, generator=g)
        >>> row, pos, col, inv_a, inv_b = info_nce_chunked_fwd(z_a, z_b, 10.0, col_lse=True,
        ...                                                    chunk=3)
        >>> row.shape, col.shape, inv_a.shape
        (torch.Size([8]), torch.Size([8]), torch.Size([8]))
        >>> loss = 0.5 * ((row - pos).mean() + (col - pos).mean())  # CLIP: both directions
        >>> torch.allclose(loss, info_nce_ref(z_a, z_b, temperature=0.1), atol=1e-5)
        True
    """
    mq, mk = zq.shape[0], zk.shape[0]
    pos_mod = mq if pos_mod is None else pos_mod
    chunk = default_chunk(mq, mk) if chunk is None else max(1, int(chunk))
    cd = _compute_dtype(zq.dtype)
    inv_q, inv_k = _inv_norm(zq, cd), _inv_norm(zk, cd)
    nq = zq.to(cd) * inv_q[:, None]
    nk = zk.to(cd) * inv_k[:, None]
    pos_col, self_col = _pairing(mq, zq.device, key_offset, pos_shift, pos_mod)
    m = torch.full((mq,), float("-inf"), dtype=cd, device=zq.device)
    s = torch.zeros(mq, dtype=cd, device=zq.device)
    pos = torch.zeros(mq, dtype=cd, device=zq.device)
    col = torch.empty(mk if col_lse else 0, dtype=cd, device=zq.device)
    for j0 in range(0, mk, chunk):
        j1 = min(j0 + chunk, mk)
        cols = torch.arange(j0, j1, device=zq.device)
        logits = (nq @ nk[j0:j1].T).mul_(scale)  # (Mq, C)
        excluded = _excluded(cols, pos_col, self_col, self_mask, groups_q, groups_k)
        if excluded is not None:
            logits.masked_fill_(excluded, float("-inf"))
        pos += torch.where(pos_col[:, None] == cols[None, :], logits, 0.0).sum(1)
        if col_lse:
            col[j0:j1] = torch.logsumexp(logits, dim=0)
        m_new = torch.maximum(m, logits.amax(dim=1))
        # A row whose candidates so far are all masked keeps m = -inf: shift by 0 instead.
        m_use = torch.where(torch.isinf(m_new), 0.0, m_new)
        s = s * torch.exp(m - m_use) + torch.exp(logits.sub_(m_use[:, None])).sum(1)
        m = m_new
    return m + torch.log(s), pos, col, inv_q, inv_k


def info_nce_chunked_bwd(
    zq: torch.Tensor,
    zk: torch.Tensor,
    inv_q: torch.Tensor,
    inv_k: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    d_row: torch.Tensor,
    d_col: torch.Tensor,
    d_pos: torch.Tensor,
    scale: float,
    key_offset: int = 0,
    pos_shift: int = 0,
    pos_mod: int | None = None,
    self_mask: bool = False,
    groups_q: torch.Tensor | None = None,
    groups_k: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dzq, dzk)`` in the input dtype from the statistics' gradients.

    Recomputes each ``(Mq, chunk)`` block of logits from ``inv_q``/``inv_k``, builds the block
    of ``dL/dlogits`` from the saved log-sum-exps and accumulates
    ``g_q = scale * G @ n_k`` (all blocks) and ``g_k = scale * G^T @ n_q`` (this block), then
    applies the normalisation's backward ``dz = inv * (g - n <n, g>)`` where
    ``<n_i, g_i> = sum_j G[i, j] L[i, j]`` comes from the same blocks.

    Args:
        zq, zk, scale, key_offset, pos_shift, pos_mod, self_mask, groups_q, groups_k, chunk: as
            given to :func:`info_nce_chunked_fwd`.
        inv_q, inv_k, row_lse, col_lse: its outputs, ``(Mq,)``, ``(Mk,)``, ``(Mq,)`` and
            ``(Mk,)`` or ``(0,)``.
        d_row: ``(Mq,)`` gradient of ``row_lse``; ``d_col``: ``(Mk,)`` of ``col_lse``, or empty;
            ``d_pos``: ``(Mq,)`` of ``pos``.

    Returns:
        ``(dzq (Mq, d), dzk (Mk, d))`` in the input dtype.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> z_a = torch.randn(8, 16, generator=g)
        >>> z_b = z_a + torch.randn(8, 16, generator=g)
        >>> row, pos, col, inv_a, inv_b = info_nce_chunked_fwd(z_a, z_b, 10.0, chunk=3)
        >>> d_row, d_pos = torch.full((8,), 1 / 8), torch.full((8,), -1 / 8)  # mean(row - pos)
        >>> dz_a, dz_b = info_nce_chunked_bwd(z_a, z_b, inv_a, inv_b, row, col, d_row,
        ...                                   torch.empty(0), d_pos, 10.0, chunk=3)
        >>> leaves = [z.clone().requires_grad_() for z in (z_a, z_b)]
        >>> info_nce_ref(*leaves, temperature=0.1, symmetric=False).backward()
        >>> dz_a.shape, dz_b.shape
        (torch.Size([8, 16]), torch.Size([8, 16]))
        >>> all(torch.allclose(t.grad, d, atol=1e-5) for t, d in zip(leaves, (dz_a, dz_b)))
        True
    """
    mq, mk = zq.shape[0], zk.shape[0]
    pos_mod = mq if pos_mod is None else pos_mod
    chunk = default_chunk(mq, mk) if chunk is None else max(1, int(chunk))
    cd = _compute_dtype(zq.dtype)
    has_col = col_lse.numel() > 0 and d_col.numel() > 0
    nq = zq.to(cd) * inv_q[:, None]
    nk = zk.to(cd) * inv_k[:, None]
    d_row, d_pos = d_row.to(cd), d_pos.to(cd)
    pos_col, self_col = _pairing(mq, zq.device, key_offset, pos_shift, pos_mod)
    g_q = torch.zeros_like(nq)
    rho_q = torch.zeros(mq, dtype=cd, device=zq.device)
    dzk = torch.empty_like(zk)
    for j0 in range(0, mk, chunk):
        j1 = min(j0 + chunk, mk)
        cols = torch.arange(j0, j1, device=zq.device)
        logits = (nq @ nk[j0:j1].T).mul_(scale)
        grad = torch.exp(logits - row_lse[:, None]).mul_(d_row[:, None])
        if has_col:
            grad += torch.exp(logits - col_lse[None, j0:j1]).mul_(d_col[None, j0:j1].to(cd))
        grad += torch.where(pos_col[:, None] == cols[None, :], d_pos[:, None], 0.0)
        excluded = _excluded(cols, pos_col, self_col, self_mask, groups_q, groups_k)
        if excluded is not None:
            grad.masked_fill_(excluded, 0.0)
        g_q.addmm_(grad, nk[j0:j1])
        rho = logits.mul_(grad)  # G * L, reusing the logits' storage
        rho_q += rho.sum(1)
        dzk[j0:j1] = _normalize_bwd(grad.T @ nq, nk[j0:j1], inv_k[j0:j1], rho.sum(0), scale)
    return _normalize_bwd(g_q, nq, inv_q, rho_q, scale).to(zq.dtype), dzk


def _excluded(cols, pos_col, self_col, self_mask, groups_q, groups_k):
    """``(Mq, C)`` mask of the pairs that are no candidates in columns ``cols`` (None: all are)."""
    excluded = None
    if self_mask:
        excluded = self_col[:, None] == cols[None, :]
    if groups_q is not None:
        same = _same_group(groups_q, groups_k[cols], pos_col - cols[0])  # cols: one range
        excluded = same if excluded is None else excluded | same
    return excluded


def _normalize_bwd(g, n, inv, rho, scale):
    """``inv * (scale * g - n * rho)``; rows clamped by ``eps`` in the forward skip the projection
    (F.normalize's derivative is ``I / eps`` there)."""
    rho = torch.where(inv < 0.5 / NORM_EPS, rho, 0.0)
    return (g * scale - n * rho[:, None]) * inv[:, None]
