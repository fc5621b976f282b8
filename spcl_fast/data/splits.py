"""Deterministic, patient-disjoint splits.

Each group (a patient, or whatever key a dataset has) gets a rank from a keyed hash of
``(seed, group)`` (BLAKE2b: the same on every machine, Python version and process, unlike
``hash()``); groups are sorted by that rank and cut at the cumulative fractions, counted in
groups. So a split never depends on row order, every image of a patient lands in the same
split, and the same (groups, fractions, seed) always give the same split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _rank(seed: int, group: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{group}".encode(), digest_size=8).digest()


def assign_groups(groups: Sequence[str], fractions: dict[str, float], seed: int = 0
                  ) -> np.ndarray:
    """Split name of every row, patient-disjoint.

    Args:
        groups: the group key (patient id) of each row, n str.
        fractions: ``{split name: fraction}`` in cut order, fractions summing to 1; each split
            gets ``round(cumulative fraction * number of groups)`` groups.
        seed: which of the possible splits.

    Returns:
        numpy array of n split names (dtype object).

    Example::

        >>> out = assign_groups(["p1", "p1", "p2", "p3"], {"train": 0.67, "test": 0.33})
        >>> out[0] == out[1], sorted(set(out))
        (True, ['test', 'train'])
    """
    total = sum(fractions.values())
    if not fractions or any(f < 0 for f in fractions.values()) or abs(total - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    unique = sorted(set(groups), key=lambda g: (_rank(seed, g), g))
    names, cuts, acc = list(fractions), [], 0.0
    for name in names:
        acc += fractions[name]
        cuts.append(round(acc / total * len(unique)))
    of_group, start = {}, 0
    for name, stop in zip(names, cuts, strict=True):
        for g in unique[start:stop]:
            of_group[g] = name
        start = stop
    return np.array([of_group[g] for g in groups], dtype=object)
