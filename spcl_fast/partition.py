"""Random partitions of each image's patch tokens into disjoint subsets (S-PCL's views).

A :class:`PartitionPlan` is all the attention kernels and pooling need: which rows of the
flattened ``(B*N)`` token tensor belong to which segment, in segment order. With two subsets
per image (the default) segment ``2b`` is subset A of image ``b`` and segment ``2b+1`` its
subset B; with ``K`` subsets, segment ``K*b + k`` is subset ``k`` of image ``b``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PartitionPlan:
    """Varlen description of the subsets of a batch.

    Attributes:
        token_index: ``(T,)`` int64, rows of the flattened ``(B*N, ...)`` token tensor, grouped by
            segment (segment ``s`` is ``token_index[cu_seqlens[s]:cu_seqlens[s+1]]``) and sorted
            within a segment.
        cu_seqlens: ``(KB+1,)`` int32 cumulative segment lengths, ``cu_seqlens[0] == 0``
            (``K`` subsets per image, 2 unless the plan was drawn with ``num_subsets``).
        max_seqlen: longest segment, as a host int (kernels size their grids with it).
        num_images: ``B``.
        num_tokens: ``N``, tokens per image.
        crop: optional ``(B, 2, 3)`` affine of one resized crop per image (``grid_sample``
            coordinates), applied to the images before their patches are partitioned (S-PCL's
            ``crop_scale``: both subsets come from the same crop); ``None``: the whole image.
            The kernels and the pooling ignore it.

    Plans come from :func:`sample_partitions`; built by hand, a plan must keep segments in
    order (``K`` consecutive segments per image) and never repeat a row.

    Example::

        >>> # image 0 (rows 0-3): A = {0, 3}, B = {1, 2}; image 1 (rows 4-7): A = {5}, B = rest
        >>> plan = PartitionPlan(
        ...     token_index=torch.tensor([0, 3, 1, 2, 5, 4, 6, 7]),
        ...     cu_seqlens=torch.tensor([0, 2, 4, 5, 8], dtype=torch.int32),
        ...     max_seqlen=3, num_images=2, num_tokens=4)
        >>> plan.num_segments, plan.subsets_per_image, plan.total_tokens
        (4, 2, 8)
        >>> plan.seqlens.tolist(), plan.segment_ids().tolist()
        ([2, 2, 1, 3], [0, 0, 1, 1, 2, 3, 3, 3])
        >>> sample_partitions(2, 4, generator=torch.Generator().manual_seed(0)).cu_seqlens
        tensor([0, 2, 4, 6, 8], dtype=torch.int32)
    """

    token_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_images: int
    num_tokens: int
    crop: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        """``KB``: segments in the plan (``K`` per image)."""
        return self.cu_seqlens.numel() - 1

    @property
    def subsets_per_image(self) -> int:
        """``K``: segments per image (2: subsets A and B)."""
        return self.num_segments // self.num_images

    @property
    def total_tokens(self) -> int:
        """``T``: tokens in any segment (``B*N`` when every token is kept)."""
        return self.token_index.numel()

    @property
    def seqlens(self) -> torch.Tensor:
        """``(KB,)`` int32 length of each segment."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def segment_ids(self) -> torch.Tensor:
        """``(T,)`` int64 segment of each packed row."""
        seg = torch.arange(self.num_segments, device=self.cu_seqlens.device)
        return torch.repeat_interleave(seg, self.seqlens.long(), output_size=self.total_tokens)

    @classmethod
    def concat(cls, plans: Sequence[PartitionPlan]) -> PartitionPlan:
        """Plans of consecutive image ranges as one plan of all their images, in order.

        Example::

            >>> a = sample_partitions(1, 4, generator=torch.Generator().manual_seed(0))
            >>> b = sample_partitions(2, 4, generator=torch.Generator().manual_seed(1))
            >>> ab = PartitionPlan.concat([a, b])
            >>> ab.num_images, ab.total_tokens, torch.equal(ab.token_index[4:], b.token_index + 4)
            (3, 12, True)
        """
        if len(plans) == 1:
            return plans[0]
        n = plans[0].num_tokens
        token_index, cu_seqlens, images, rows = [], [plans[0].cu_seqlens[:1]], 0, 0
        for p in plans:
            token_index.append(p.token_index + images * n)
            cu_seqlens.append(p.cu_seqlens[1:] + rows)
            images, rows = images + p.num_images, rows + p.total_tokens
        if any((p.crop is None) != (plans[0].crop is None) for p in plans):
            raise ValueError("PartitionPlan.concat: plans with and without crops")
        crop = None if plans[0].crop is None else torch.cat([p.crop for p in plans])
        return cls(torch.cat(token_index), torch.cat(cu_seqlens),
                   max(p.max_seqlen for p in plans), images, n, crop)

    def to(self, device: torch.device | str) -> PartitionPlan:
        """The same plan with its tensors on ``device`` (non-blocking copies)."""
        return PartitionPlan(
            self.token_index.to(device, non_blocking=True),
            self.cu_seqlens.to(device, non_blocking=True),
            self.max_seqlen,
            self.num_images,
            self.num_tokens,
            None if self.crop is None else self.crop.to(device, non_blocking=True),
        )


def sample_partitions(
    batch_size: int,
    num_tokens: int,
    ratio: float = 0.5,
    ratio_range: tuple[float, float] | None = None,
    keep: float = 1.0,
    valid_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    block_size: int = 1,
    shared: bool = False,
    num_subsets: int = 2,
    partition: str = "random",
    target_blocks: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
) -> PartitionPlan:
    """Split each image's tokens at random into disjoint subsets: A and B, or ``num_subsets``.

    Args:
        batch_size: ``B``, images in the batch.
        num_tokens: ``N``, patch tokens per image.
        ratio: fraction of an image's kept tokens that go to subset A (the rest go to B).
        ratio_range: ``(lo, hi)``; when given, each image draws its own ratio uniformly from it
            and ``ratio`` is ignored.
        keep: fraction of an image's valid tokens used at all; ``keep < 1`` leaves the rest in
            no subset (cheaper steps, harder views).
        valid_mask: optional ``(B, N)`` bool; only ``True`` tokens may be chosen (e.g. to skip
            background patches).
        generator: ``torch.Generator`` for reproducible plans (same seed, same plan); its device
            is used when ``device`` is not given.
        device: where the plan's tensors live.
        block_size: ``1`` splits tokens independently. ``k > 1`` needs a square token grid and
            draws whole ``k x k`` blocks of patches instead, so each subset is a set of
            contiguous regions (only the block at each size boundary may be split) and the
            two views cannot be matched by local texture alone.
        shared: draw one split for the whole batch: every image puts the same token positions
            in subset A (up to its own ``valid_mask`` and ratio). With a split per image of all
            tokens into two, the positions of subset A fix those of B (its complement), so an
            encoder can pair the two subsets of an image from their position embeddings alone,
            without looking at the image; a shared split removes that shortcut.
        num_subsets: ``K >= 2`` subsets per image. With ``K > 2`` the kept tokens are dealt
            into ``K`` subsets of equal size (sizes differ by at most one), so ``ratio`` and
            ``ratio_range`` (which size subset A against B) must stay unset.
        partition: ``"random"`` (the rules below) or ``"anatomy"`` (I-JEPA's target blocks,
            on a square grid): subset B is the union of ``target_blocks`` random rectangles
            (area fraction ``U(target_scale)``, ``0 < lo <= hi < 1``, aspect ratio in [0.75,
            1.5]), subset A the rest; ``ratio``, ``ratio_range``, ``block_size`` and
            ``num_subsets`` must stay unset. ``keep < 1`` thins each subset at random to
            ``max(round(keep * n), 1)`` of its ``n`` valid tokens; both subsets are non-empty
            whenever an image has two valid tokens (see :func:`_anatomy_subsets`).
        target_blocks, target_scale: ``"anatomy"``'s blocks (they may overlap).

    Every image with at least ``K`` kept tokens gets ``K`` non-empty subsets; an image with
    fewer valid tokens fills the first subsets with one token each; an image with none yields
    ``K`` empty segments. Sizes are ``n_keep = max(round(keep * n_valid), min(n_valid, K))``;
    with two subsets ``n_A = clamp(round(ratio * n_keep), 1, n_keep - 1)``, with more, subset
    ``k`` holds the kept tokens of random rank ``r`` with ``floor(r K / n_keep) == k``.

    Example::

        >>> plan = sample_partitions(4, 196, generator=torch.Generator().manual_seed(0))
        >>> plan.cu_seqlens.tolist()[:3], plan.max_seqlen
        ([0, 98, 196], 98)
    """
    batch_size, num_tokens, num_subsets, block_size, device, valid = _checked_arguments(
        batch_size, num_tokens, ratio, ratio_range, keep, valid_mask, generator, device,
        block_size, num_subsets)
    if partition != "random":
        _check_anatomy(partition, num_tokens, ratio, ratio_range, block_size, num_subsets,
                       target_blocks, target_scale)

    def rand(*shape: int) -> torch.Tensor:
        if generator is None:
            return torch.rand(*shape, device=device)
        return torch.rand(*shape, device=generator.device, generator=generator).to(device)

    if partition == "anatomy":
        n = 1 if shared else batch_size
        inside = _target_blocks(rand, n, num_tokens, target_blocks, target_scale)
        return _plan_of(_anatomy_subsets(inside.expand(batch_size, -1), valid, keep, rand), 2)

    # Random priorities; invalid tokens sort last, so the first n_valid ranks are valid tokens.
    priority = _block_priorities(rand, 1 if shared else batch_size, num_tokens, block_size)
    priority = priority.expand(batch_size, -1)
    priority = torch.where(valid, priority, torch.full_like(priority, 3.0))
    order = priority.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_tokens, device=device).expand(batch_size, -1))

    k = num_subsets
    n_valid = valid.sum(dim=1)
    n_keep = torch.maximum(torch.round(n_valid * keep).long(), n_valid.clamp(max=k))
    kept = rank < n_keep[:, None]
    subset = _subset_of_rank(rank, n_keep, k, ratio, ratio_range, rand, shared)
    return _plan_of(torch.where(kept, subset, -1), k)


def _plan_of(subset: torch.Tensor, k: int) -> PartitionPlan:
    """The plan of a ``(B, N)`` map of each token's subset in ``[0, K)``, or -1 (in none)."""
    batch_size, num_tokens = subset.shape
    device = subset.device
    kept = subset >= 0
    # Sorting by (segment, token) groups segments and keeps each segment's rows ascending,
    # which helps the in-place gather.
    segment = k * torch.arange(batch_size, device=device)[:, None] + subset
    key = segment * num_tokens + torch.arange(num_tokens, device=device)
    segment, key = segment[kept], key[kept].sort().values
    token_index = (key // (k * num_tokens)) * num_tokens + key % num_tokens
    seqlens = torch.bincount(segment, minlength=k * batch_size)
    cu_seqlens = torch.zeros(k * batch_size + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = seqlens.cumsum(0)
    return PartitionPlan(
        token_index=token_index,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(seqlens.max()),
        num_images=batch_size,
        num_tokens=num_tokens,
    )


def _checked_arguments(batch_size, num_tokens, ratio, ratio_range, keep, valid_mask, generator,
                       device, block_size, num_subsets):
    """:func:`sample_partitions`' arguments checked (one error naming the argument) and
    normalised: the ints, the device and the ``(B, N)`` valid mask."""
    for name, value in (("batch_size", batch_size), ("num_tokens", num_tokens),
                        ("num_subsets", num_subsets), ("block_size", block_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"sample_partitions: {name} must be an int, got {value!r}")
    batch_size, num_tokens, num_subsets, block_size = (
        int(batch_size), int(num_tokens), int(num_subsets), int(block_size))
    if batch_size < 1 or num_tokens < 1:
        raise ValueError(
            f"sample_partitions: batch_size and num_tokens must be >= 1, "
            f"got {batch_size} and {num_tokens}"
        )
    for name, value in (("ratio", ratio), ("keep", keep)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"sample_partitions: {name} must be a number, got {value!r}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"sample_partitions: keep must be in (0, 1], got {keep}")
    if ratio_range is not None:
        if (not isinstance(ratio_range, Sequence) or len(ratio_range) != 2
                or not all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                           for x in ratio_range)):
            raise TypeError(f"sample_partitions: ratio_range must be a (lo, hi) pair of "
                            f"numbers, got {ratio_range!r}")
        lo, hi = ratio_range
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(
                f"sample_partitions: ratio_range must satisfy 0 < lo <= hi < 1, got {ratio_range}"
            )
    elif not 0.0 < ratio < 1.0:
        raise ValueError(f"sample_partitions: ratio must be in (0, 1), got {ratio}")
    if num_subsets < 2:
        raise ValueError(f"sample_partitions: num_subsets must be >= 2, got {num_subsets}")
    if num_subsets > 2 and (ratio != 0.5 or ratio_range is not None):
        raise ValueError(
            f"sample_partitions: ratio and ratio_range size subset A against B; with "
            f"num_subsets={num_subsets} the subsets are of equal size, so leave them unset"
        )
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if valid_mask is not None:
        if (not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool
                or tuple(valid_mask.shape) != (batch_size, num_tokens)):
            got = (f"{tuple(valid_mask.shape)} {valid_mask.dtype}"
                   if isinstance(valid_mask, torch.Tensor) else type(valid_mask).__name__)
            raise ValueError(
                f"sample_partitions: valid_mask must be a ({batch_size}, {num_tokens}) bool "
                f"tensor, got {got}"
            )
        valid = valid_mask.to(device)
    else:
        valid = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)

    return batch_size, num_tokens, num_subsets, block_size, device, valid


def _check_anatomy(partition, num_tokens, ratio, ratio_range, block_size, num_subsets,
                   target_blocks, target_scale) -> None:
    """The ``partition`` argument and, for ``"anatomy"``, the settings it rules out or needs
    (one error naming the argument)."""
    if partition != "anatomy":
        raise ValueError(f"sample_partitions: partition must be 'random' or 'anatomy', got "
                         f"{partition!r}")
    for name, unset in (("ratio", ratio == 0.5), ("ratio_range", ratio_range is None),
                        ("block_size", block_size == 1), ("num_subsets", num_subsets == 2)):
        if not unset:
            raise ValueError(f"sample_partitions: partition='anatomy' sizes its two subsets by "
                             f"its target blocks; leave {name} unset")
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"sample_partitions: partition='anatomy' needs a square token grid, "
                         f"got num_tokens={num_tokens}")
    if (not isinstance(target_blocks, numbers.Integral) or isinstance(target_blocks, bool)
            or target_blocks < 1):
        raise ValueError(f"sample_partitions: target_blocks must be an int >= 1, got "
                         f"{target_blocks!r}")
    if (not isinstance(target_scale, Sequence) or len(target_scale) != 2
            or not all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                       for x in target_scale)
            or not 0.0 < target_scale[0] <= target_scale[1] < 1.0):
        raise ValueError(f"sample_partitions: target_scale must be (lo, hi) with "
                         f"0 < lo <= hi < 1, got {target_scale!r}")


def _target_blocks(rand, batch_size: int, num_tokens: int, count: int,
                   scale: tuple[float, float]) -> torch.Tensor:
    """``(B, N)`` bool: tokens inside any of ``count`` random rectangles of the square patch
    grid (I-JEPA's target blocks: area fraction ``U(scale)``, aspect ``U(log 3/4, log 3/2)``
    in log space, sides rounded and clipped to ``[1, grid]``, top-left corner uniform)."""
    grid = math.isqrt(num_tokens)
    u = rand(4, batch_size, count)
    lo, hi = scale
    area = (lo + (hi - lo) * u[0]) * num_tokens
    aspect = torch.exp(math.log(0.75) + (math.log(1.5) - math.log(0.75)) * u[1])
    height = torch.round(torch.sqrt(area * aspect)).clamp(1, grid)
    width = torch.round(torch.sqrt(area / aspect)).clamp(1, grid)
    # u < 1, so the floor stays in [0, grid - side]
    top = torch.floor(u[2] * (grid - height + 1))
    left = torch.floor(u[3] * (grid - width + 1))
    coord = torch.arange(grid, device=u.device, dtype=u.dtype)
    rows = (coord >= top[..., None]) & (coord < (top + height)[..., None])  # (B, count, grid)
    cols = (coord >= left[..., None]) & (coord < (left + width)[..., None])
    return (rows[..., :, None] & cols[..., None, :]).any(dim=1).reshape(batch_size, num_tokens)


def _anatomy_subsets(inside: torch.Tensor, valid: torch.Tensor, keep: float,
                     rand) -> torch.Tensor:
    """``(B, N)`` subset map of ``"anatomy"`` partitions: 1 (B) for valid tokens ``inside`` the
    target blocks, 0 (A) for the other valid ones, each side thinned to ``keep``; -1 elsewhere.
    A side with no valid token takes the image's first valid token in a random order."""
    batch_size, num_tokens = valid.shape
    subset = torch.where(inside, 1, 0)
    priority = rand(batch_size, num_tokens).masked_fill(~valid, 3.0)
    first = priority.argmin(dim=1, keepdim=True)  # a valid token whenever the image has one
    for side in (1, 0):  # B first: an image of one valid token ends with it in A, as "random"
        empty = ~(valid & (subset == side)).any(dim=1, keepdim=True)
        moved = subset.gather(1, first).masked_fill(empty, side)
        subset = subset.scatter(1, first, moved)
    subset = torch.where(valid, subset, -1)
    if keep == 1.0:
        return subset
    for side in (0, 1):  # the first random ranks of each side stay
        mine = subset == side
        rank = torch.where(mine, priority, 3.0).argsort(dim=1).argsort(dim=1)
        n = mine.sum(dim=1, keepdim=True)
        n_keep = torch.maximum(torch.round(n * keep).long(), n.clamp(max=1))
        subset = torch.where(mine & (rank >= n_keep), -1, subset)
    return subset


def _subset_of_rank(rank, n_keep, k, ratio, ratio_range, rand, shared) -> torch.Tensor:
    """``(B, N)`` subset in ``[0, K)`` of each token from its random rank among the kept ones
    (tokens of rank ``>= n_keep`` are dropped by the caller)."""
    batch_size = rank.shape[0]
    if k > 2:
        dealt = rank * k // n_keep.clamp(min=1)[:, None]
        return torch.where((n_keep >= k)[:, None], dealt, rank)  # few tokens: one per subset
    if ratio_range is not None:
        lo, hi = ratio_range
        ratios = lo + (hi - lo) * rand(1 if shared else batch_size).expand(batch_size)
    else:
        ratios = torch.full((batch_size,), ratio, device=rank.device)
    n_a = torch.round(ratios * n_keep).long()
    n_a = torch.minimum(n_a.clamp(min=1), (n_keep - 1).clamp(min=1)).clamp(max=n_keep)
    return (rank >= n_a[:, None]).long()


def _block_priorities(rand, batch_size: int, num_tokens: int, block_size: int) -> torch.Tensor:
    """``(B, N)`` random priorities in [0, 2); tokens of one block share a priority up to a
    tie-breaking offset below the gap between blocks, so they sort next to each other."""
    if block_size == 1:
        return rand(batch_size, num_tokens)
    grid = int(round(num_tokens**0.5))
    if block_size < 1 or grid * grid != num_tokens:
        raise ValueError(
            f"sample_partitions: block_size={block_size} needs a square token grid and "
            f"block_size >= 1, got num_tokens={num_tokens}"
        )
    blocks_per_side = -(-grid // block_size)
    block_rank = rand(batch_size, blocks_per_side**2).argsort(dim=1).argsort(dim=1).float()
    row = torch.arange(grid, device=block_rank.device) // block_size
    block_of_token = (row[:, None] * blocks_per_side + row[None, :]).reshape(-1)
    within = rand(batch_size, num_tokens)  # random order inside a block, in [0, 1)
    return (block_rank[:, block_of_token] + within) / blocks_per_side**2
