"""Who sees what: the data order sharded over processes and accumulation steps, and the step's
random plans (partitions, masks, crops) drawn in independent per-shard streams.

A global batch of ``B = batch_size`` images per optimizer step is cut into ``A = accum_steps``
micro-steps of ``W * m`` images (``W`` processes, ``m = B / (W * A)`` each); micro-step ``k`` of
rank ``r`` takes images ``(k * W + r) * m ...`` of the step's slice of the epoch order. So every
micro-step is one contiguous slice of the order, spread over the ranks, and no image is seen
twice per epoch by any rank.

With ``batch_grouping="similar"`` the epoch order is composed so that each global batch holds
images that look alike at a glance (:func:`similar_order`): with the default one-cell
thumbnail its in-batch negatives share exposure, and a contrastive loss cannot separate them
by that cue alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.memory import group_ids, resident_images


class BatchStream:
    """This rank's images of each optimizer step, in a fresh random order each epoch (seeded by
    ``(seed, epoch)``, the same on every rank): no image twice per epoch, the last incomplete
    global batch dropped. Its position (global: images consumed) is part of the checkpoint, so a
    resumed run, even on another number of processes, sees exactly the batches it would have.

    ``source`` is a dataset. One that holds its films in memory
    (:func:`~spcl_fast.data.memory.resident_images`: the synthetic set, ``nih-demo``,
    :class:`~spcl_fast.data.TensorImages`) is indexed as one tensor, moved to ``device`` once;
    any other is read through a ``DataLoader`` with ``num_workers`` processes (pinned batches
    when ``device`` is a GPU). ``next()`` returns this rank's ``accum_steps * m`` images of the
    step, micro-step by micro-step; ``next_batch()`` returns them with their patients' ids
    (:func:`~spcl_fast.data.memory.group_ids`, on ``device``; None for a dataset without
    ``patient_ids``).

    ``grouping="similar"`` composes each epoch's global batches of look-alike images
    (:func:`similar_order` on :func:`thumbnails` of side ``group_grid``; a real dataset is read
    once for them, by every rank).
    """

    def __init__(self, source, batch_size: int, seed: int, num_workers: int = 0, rank: int = 0,
                 world: int = 1, accum_steps: int = 1, device: torch.device | None = None,
                 grouping: str = "random", group_grid: int = 1):
        if len(source) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(source)} images")
        if batch_size % (world * accum_steps):
            raise ValueError(
                f"batch_size {batch_size} is not a multiple of processes x accum_steps "
                f"= {world} x {accum_steps}"
            )
        self.device = torch.device(device or "cpu")
        resident = resident_images(source)
        self.resident = None if resident is None else resident.to(self.device)
        self.groups = group_ids(source)
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.num_workers, self.rank, self.world = num_workers, rank, world
        self.accum_steps, self.micro = accum_steps, batch_size // (world * accum_steps)
        self.epoch, self.position = 0, 0
        if grouping not in ("random", "similar"):
            raise ValueError(f"batch_grouping must be 'random' or 'similar', got {grouping!r}")
        self.descriptors = (thumbnails(source, group_grid, num_workers, progress=rank == 0)
                            if grouping == "similar" else None)
        self._loader = None
        self._order_cache: tuple[int, torch.Tensor] | None = None

    def _order(self) -> torch.Tensor:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = (torch.randperm(len(self.source), generator=g) if self.descriptors is None
                     else similar_order(self.descriptors, self.batch_size, g))
            self._order_cache = (self.epoch, order)
        return self._order_cache[1]

    def local(self, block: torch.Tensor) -> torch.Tensor:
        """This rank's indices of consecutive global batches ``block`` (``(k * B,)``), step by
        step and micro-step by micro-step."""
        steps = block.view(-1, self.accum_steps, self.world, self.micro)
        return steps[:, :, self.rank].reshape(-1)

    def next(self) -> torch.Tensor:
        return self.next_batch()[0]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.position + self.batch_size > len(self.source):
            self.epoch, self.position, self._loader = self.epoch + 1, 0, None
        rows = self.local(self._order()[self.position : self.position + self.batch_size])
        if self.resident is not None:
            batch = self.resident[rows.to(self.device)]
        else:
            if self._loader is None:  # (re)start the epoch at the saved position
                whole = (len(self.source) - self.position) // self.batch_size * self.batch_size
                block = self._order()[self.position : self.position + whole]
                self._loader = iter(
                    torch.utils.data.DataLoader(
                        torch.utils.data.Subset(self.source, self.local(block).tolist()),
                        batch_size=self.accum_steps * self.micro,
                        num_workers=self.num_workers,
                        pin_memory=self.device.type == "cuda",
                        # Its own generator: worker seeds must not draw from (and so shift)
                        # the global RNG when a resumed run restarts the loader mid-epoch.
                        generator=torch.Generator().manual_seed(self.seed + self.epoch),
                    )
                )
            batch = next(self._loader)["image"]
        self.position += self.batch_size
        groups = None if self.groups is None else self.groups[rows].to(self.device)
        return batch, groups

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._loader = None


def thumbnails(source, grid: int, num_workers: int = 0, progress: bool = False) -> torch.Tensor:
    """``(n, grid * grid)`` float32 descriptors of the images of the dataset ``source``: each
    image average-pooled to a ``grid x grid`` thumbnail, then every cell standardised over the
    images, so distances weigh all cells alike. ``grid=1`` is the film's mean brightness
    (exposure); a coarse grid such as 4 also holds position and size of the thorax, but little
    of a finding's detail. With the intra-image term, grid 1 helps on the real sample and grid
    4 hurts (docs/study.md). ``progress``: a progress bar while a dataset is read."""
    if grid < 1:
        raise ValueError(f"group_grid must be >= 1, got {grid}")
    resident = resident_images(source)
    if resident is not None:
        batches = resident.split(1024)
    else:
        loader = torch.utils.data.DataLoader(source, batch_size=256, num_workers=num_workers)
        batches = (b["image"] for b in tqdm(loader, desc="look-alike batches: thumbnails",
                                            unit="batch", disable=not progress))
    thumbs = torch.cat([F.adaptive_avg_pool2d(b.float().cpu(), grid).flatten(1)
                        for b in batches])
    return (thumbs - thumbs.mean(0)) / thumbs.std(0).clamp_min(1e-6)


def similar_order(descriptors: torch.Tensor, batch_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(n)`` whose consecutive ``batch_size`` slices are groups of
    similar images: repeatedly a random image not yet placed and its ``batch_size - 1``
    nearest unplaced neighbours (Euclidean, ``descriptors (n, d)``) form the next batch, in
    random order within it. The groups change from epoch to epoch (``generator`` draws the
    anchors); the last ``n % batch_size`` images, whatever was left, end the order (the
    stream drops them as the incomplete batch). ``O(n^2 d / batch_size)``."""
    n = descriptors.shape[0]
    anchors = torch.randperm(n, generator=generator)
    free = torch.ones(n, dtype=torch.bool)
    groups, cursor = [], 0
    for _ in range(n // batch_size):
        while not free[anchors[cursor]]:
            cursor += 1
        anchor = anchors[cursor]
        dist = (descriptors - descriptors[anchor]).square().sum(1)
        dist[~free] = float("inf")
        dist[anchor] = -1.0  # the anchor itself, even among exact duplicates
        members = dist.topk(batch_size, largest=False).indices
        free[members] = False
        groups.append(members[torch.randperm(batch_size, generator=generator)])
    rest = free.nonzero().flatten()
    groups.append(rest[torch.randperm(len(rest), generator=generator)])
    # the batches in random order too: later ones are made of what the earlier left
    order = torch.randperm(len(groups) - 1, generator=generator).tolist()
    return torch.cat([groups[i] for i in order] + [groups[-1]])


def shard_seed(seed: int, shard: int) -> int:
    """Seed of partition stream ``shard`` (stream 0 is ``seed + 1``, what one process uses)."""
    return seed + 1 + 1_000_003 * shard


class PlanSampler:
    """Each micro-step's random plan, drawn on the host from ``num_shards`` independent
    generators: rank ``r`` of ``W`` owns streams ``r*S/W ... (r+1)*S/W - 1`` and draws an equal
    part of its micro-batch from each, so the concatenated plan of a step does not depend on how
    the streams are spread over processes. One process with ``plan_shards=W`` therefore replays
    the partitions of a ``W``-process run (how the multi-process tests compare them), and each
    rank samples only its own images (a global plan of thousands of images costs tens of ms of
    host time per step). What a method draws in its forward pass instead comes from each
    process's torch RNG (checkpointed, so resuming stays exact): S-PCL's intra-image queries
    (only a choice when a subset has more tokens than ``intra_queries``; drawn image by image,
    so accumulated micro-batches draw what their whole batch would) and its subset jitter and
    warp, so there a one-process replay differs from the ``W``-process run.
    """

    def __init__(self, seed: int, num_shards: int, rank: int = 0, world: int = 1):
        if num_shards < 1 or num_shards % world:
            raise ValueError(f"plan_shards {num_shards} must be a positive multiple of the "
                             f"{world} processes")
        self.num_shards, self.per_rank = num_shards, num_shards // world
        self.shards = range(rank * self.per_rank, (rank + 1) * self.per_rank)
        self.generators = [torch.Generator().manual_seed(shard_seed(seed, j)) for j in self.shards]

    def sample(self, model: torch.nn.Module, images: torch.Tensor):
        """The plan of a micro-batch ``images`` (only methods whose plans depend on the pixels,
        e.g. S-PCL's background skipping, look at them)."""
        num_images = images.shape[0]
        if num_images % self.per_rank:
            raise ValueError(f"a micro-batch of {num_images} images does not split into "
                             f"{self.per_rank} partition streams")
        part = num_images // self.per_rank
        plans = [model.sample_plan(part, g, "cpu", images[j * part:(j + 1) * part])
                 for j, g in enumerate(self.generators)]
        return plans[0] if len(plans) == 1 else type(plans[0]).concat(plans)

    def state(self) -> list[torch.Tensor]:
        """Generator states of this rank's streams."""
        return [g.get_state() for g in self.generators]

    def load(self, states: list[torch.Tensor]) -> bool:
        """Restore from all streams' states (shard order); ``False`` when the count differs
        (another ``plan_shards``): streams present in both are restored, new ones keep their
        seeds."""
        for j, g in zip(self.shards, self.generators, strict=True):
            if j < len(states):
                g.set_state(states[j])
        return len(states) == self.num_shards


def plan_to(plan, device: torch.device):
    """``plan.to(device)``; on a GPU from pinned copies, so the copies are truly asynchronous
    (a copy from pageable memory blocks the host)."""
    if device.type == "cuda":
        pinned = {f.name: getattr(plan, f.name).pin_memory() for f in dataclasses.fields(plan)
                  if isinstance(getattr(plan, f.name), torch.Tensor)}
        plan = dataclasses.replace(plan, **pinned)
    return plan.to(device)
