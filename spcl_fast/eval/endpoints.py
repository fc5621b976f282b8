"""The evaluation's endpoints, built from the releases' own columns.

* NIH ChestX-ray14 (:func:`nih_endpoints`): primary ``abnormal`` — any of the 14 findings
  against "No Finding" — and, secondary, each finding with at least ``min_positives`` positive
  films among both the training and the test films.
* Kermany pediatric (:func:`kermany_table`): pneumonia against normal, read from the copy's
  ``manifest.csv`` (``path,patient,label,detail,sha1``); byte-identical files (one ``sha1``)
  count once, as the first of the group by path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..data.base import read_csv, safe_join
from ..data.errors import DataFormatError

MIN_POSITIVES = 20
KERMANY_LABELS = {"NORMAL": 0, "PNEUMONIA": 1}


def nih_endpoints(findings: np.ndarray, class_names: Sequence[str], train_idx: np.ndarray,
                  test_idx: np.ndarray, min_positives: int = MIN_POSITIVES
                  ) -> dict[str, np.ndarray]:
    """``{"abnormal": (n,), finding: (n,), ...}`` 0/1 labels of every film: ``abnormal`` first
    (primary), then each finding of ``class_names`` (the columns of ``findings (n, C)``) with
    at least ``min_positives`` positives among the ``train_idx`` films and among the
    ``test_idx`` films.

    Example::

        >>> f = np.array([[0, 0], [1, 0], [1, 1], [0, 1]])
        >>> ends = nih_endpoints(f, ["A", "B"], np.array([0, 1, 2]), np.array([3]), 1)
        >>> {k: v.tolist() for k, v in ends.items()}
        {'abnormal': [0, 1, 1, 1], 'B': [0, 0, 1, 1]}
    """
    findings = np.asarray(findings).astype(int)
    if findings.ndim != 2 or findings.shape[1] != len(class_names):
        raise ValueError(f"findings {findings.shape} do not match {len(class_names)} classes")
    out = {"abnormal": (findings.sum(1) > 0).astype(int)}
    for c, name in enumerate(class_names):
        col = findings[:, c]
        if min(col[train_idx].sum(), col[test_idx].sum()) >= min_positives:
            out[name] = col
    return out


def kermany_table(root: str | os.PathLike) -> dict[str, list]:
    """The films of the Kermany pediatric copy at ``root`` (its ``manifest.csv``), one per
    distinct ``sha1``: ``{"paths": absolute paths, "patient_ids": [...], "labels": 0/1
    (pneumonia), "sha1": [...]}``, sorted by path. Patient ids are prefixed by the label (the
    release names normal and pneumonia patients in separate spaces)."""
    root = os.fspath(root)
    manifest = os.path.join(root, "manifest.csv")
    cols = read_csv(manifest, ["path", "patient", "label", "sha1"])
    seen, out = set(), {"paths": [], "patient_ids": [], "labels": [], "sha1": []}
    for k in sorted(range(len(cols["path"])), key=lambda k: cols["path"][k]):
        label = cols["label"][k]
        if label not in KERMANY_LABELS:
            raise DataFormatError(f"{manifest}: label {label!r} of {cols['path'][k]} is not "
                                  f"one of {sorted(KERMANY_LABELS)}")
        if cols["sha1"][k] in seen:
            continue
        seen.add(cols["sha1"][k])
        out["paths"].append(safe_join(root, cols["path"][k], manifest))
        out["patient_ids"].append(f"{label}:{cols['patient'][k]}")
        out["labels"].append(KERMANY_LABELS[label])
        out["sha1"].append(cols["sha1"][k])
    return out
