"""Label fractions by patient, and light views of datasets (subsets, first-N).

Low-label evaluation (1 % or 10 % of the training labels) samples PATIENTS, not images: every
image of a chosen patient is kept and no other, so the training subset stays patient-disjoint
from val and test exactly as the full split is. The sample is a prefix of one seeded random
order of the sorted distinct patient ids, so it depends only on (patient ids, fraction, seed):
every method compared with the same seed sees the same images, and a smaller fraction is a
subset of a larger one. Datasets without ``patient_ids`` (the synthetic set) count each image
as its own patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_SEED = 0


def patient_ids_of(dataset) -> list[str]:
    """``dataset.patient_ids`` as strings, or its ``ids`` (one patient per image) without them."""
    pids = getattr(dataset, "patient_ids", None)
    if pids is None:
        pids = dataset.ids
    return [str(p) for p in pids]


def sample_patients(patient_ids: Sequence[str], fraction: float,
                    seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Indices (sorted, int64) of the items whose patient is in a seeded ``fraction`` of the
    distinct patients; at least one patient is kept.

    Example::

        >>> pids = ["p1", "p1", "p2", "p3", "p3", "p3", "p4", "p5"]
        >>> idx = sample_patients(pids, 0.4, seed=0)
        >>> len({pids[i] for i in idx})  # ceil(0.4 * 5) patients, all of their images
        2
        >>> sample_patients(pids, 1.0).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    pids = [str(p) for p in patient_ids]
    patients = sorted(set(pids))  # sorted: the sample must not depend on the dataset's order
    order = torch.randperm(len(patients), generator=torch.Generator().manual_seed(seed))
    count = max(1, math.ceil(fraction * len(patients) - 1e-9))
    chosen = {patients[i] for i in order[:count].tolist()}
    return torch.tensor([i for i, p in enumerate(pids) if p in chosen], dtype=torch.int64)


class DatasetView:
    """The items ``indices`` of ``dataset`` with the dataset contract's attributes (``labels``,
    ``ids``, ``class_names``, ``patient_ids``) restricted to them.

    Example::

        >>> from spcl_fast.data import SyntheticCXR
        >>> view = DatasetView(SyntheticCXR("val", num_images=8), [1, 5])
        >>> len(view), view.ids, view.labels.shape
        (2, ['synthetic-val-000001', 'synthetic-val-000005'], torch.Size([2, 5]))
    """

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.class_names = tuple(dataset.class_names)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.float32)[self.indices]
        self.ids = [dataset.ids[i] for i in self.indices]
        pids = patient_ids_of(dataset)
        self.patient_ids = [pids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]


def label_fraction_view(dataset, fraction: float, seed: int = DEFAULT_SEED):
    """``dataset`` itself for ``fraction == 1``, else a :class:`DatasetView` of a patient
    sample (see :func:`sample_patients`)."""
    if fraction == 1.0:
        return dataset
    return DatasetView(dataset, sample_patients(patient_ids_of(dataset), fraction, seed))
