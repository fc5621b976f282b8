"""The end-of-training probe by patient: pre-trained encoder, the same encoder at
initialisation and raw pixels, scored on test patients never seen in pre-training, each AUROC
with its patient-level interval and the paired differences with theirs.

The probe trains on every training patient (the dataset's ``train`` and ``val`` splits, which
pre-training drew from or never saw), its L2 strength chosen by grouped cross-validation on
them (:func:`~spcl_fast.eval.patient.fit_probe`), and scores the ``test`` patients; intervals
are the cluster bootstrap of :func:`~spcl_fast.eval.patient.cluster_bootstrap`. This is what
``python -m spcl_fast.train`` prints at the end of a run on a dataset with patient ids and one
label column (the demo: ``nih-demo``, normal vs abnormal).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..data.memory import resident_images
from .patient import (
    fmt_interval,
    pixel_features,
    probe_scores,
    readout_features,
    resampled_aurocs,
    summarise,
)

BASELINES = ("init", "raw_pixels")
LABELS = {"pretrained": "pre-trained", "init": "init", "raw_pixels": "raw pixels"}


def split_arrays(source) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """``(images (n, 1, S, S), labels (n,), patient ids)`` of a dataset with one label column
    and ``patient_ids`` (e.g. :class:`~spcl_fast.data.NIHDemo`), or of a ``Subset`` of one
    (``--num-images``)."""
    base, rows = source, None
    if isinstance(source, torch.utils.data.Subset):
        base, rows = source.dataset, list(source.indices)
    pids = getattr(base, "patient_ids", None)
    labels = torch.as_tensor(base.labels)
    if pids is None or labels.dim() != 2 or labels.shape[1] != 1:
        raise ValueError(f"a patient probe needs patient ids and one label column; "
                         f"{type(base).__name__} has labels {tuple(labels.shape)} and "
                         f"{'no ' if pids is None else ''}patient ids")
    rows = list(range(len(base))) if rows is None else rows
    images = resident_images(source)
    if images is None:
        images = torch.stack([source[i]["image"] for i in range(len(source))])
    return images, labels[rows, 0].numpy(), [str(pids[i]) for i in rows]


def probe_by_patient(train: tuple, test: tuple, encoders: dict[str, nn.Module],
                  transform: Callable[[torch.Tensor], torch.Tensor], endpoint: str = "",
                  resamples: int = 2000, seed: int = 0) -> dict:
    """Linear probes on mean-pooled tokens of each encoder and on raw pixels, trained on
    ``train`` and scored on ``test`` (each ``(images, labels (n,), patient ids)``).

    ``encoders`` maps names to encoders (``pretrained`` first; ``init`` beside it); raw pixels
    are added as ``raw_pixels``. Returns ``{"endpoint", "train_films", "train_patients",
    "test_films", "test_patients", "chosen_c", "auroc", "difference", "resamples", "level"}``,
    the differences being the first encoder minus each other row.
    """
    x_train, y_train, g_train = train
    x_test, y_test, g_test = test
    if set(g_train) & set(g_test):
        raise ValueError("train and test share patients: the probe must be patient-disjoint")
    features = {name: (readout_features(enc, x_train, transform)["mean"],
                       readout_features(enc, x_test, transform)["mean"])
                for name, enc in encoders.items()}
    features["raw_pixels"] = (pixel_features(x_train, transform),
                              pixel_features(x_test, transform))
    scores, chosen = {}, {}
    for name, (a, b) in features.items():
        scores[name], chosen[name] = probe_scores(a, y_train, g_train, b, seed=seed)
    values, samples, patients = resampled_aurocs(scores, y_test, g_test, resamples, seed)
    first = next(iter(encoders))
    pairs = [(first, other) for other in scores if other != first]
    return {"endpoint": endpoint, "train_films": len(y_train),
            "train_patients": len(set(g_train)), "test_films": len(y_test),
            "test_patients": patients, "chosen_c": chosen,
            **summarise(values, samples, pairs)}


def format_patient_probe(result: dict) -> str:
    """The printed lines of a :func:`probe_by_patient` result."""
    level = round(100 * result["level"])
    lines = [f"{result['endpoint'] or 'test'} AUROC by patient: linear probe on mean-pooled "
             f"tokens, trained on {result['train_films']} films of {result['train_patients']} "
             f"training patients, tested on {result['test_films']} films of "
             f"{result['test_patients']} other patients ({level}% interval: cluster bootstrap "
             f"over test patients, {result['resamples']} resamples)"]
    for name, entry in result["auroc"].items():
        lines.append(f"  {LABELS.get(name, name):<12} {fmt_interval(entry)}")
    for pair, entry in result["difference"].items():
        a, b = pair.split(" - ")
        lines.append(f"  {LABELS.get(a, a)} - {LABELS.get(b, b):<11} "
                     f"{fmt_interval(entry, signed=True)}")
    lines.append("  (an interval of a difference that holds 0 is no difference these test "
                 "patients can show)")
    return "\n".join(lines)


def applies(config) -> bool:
    """Whether a run's dataset gets :func:`probe_run` at its end: its test split has patient
    ids and one label column (``nih-demo``: normal vs abnormal)."""
    from ..run.data import load_split

    if config.data.dataset == "synthetic":  # the phantoms have no patients
        return False
    source, labels, _ = load_split(config, "test")
    return getattr(source, "patient_ids", None) is not None and tuple(labels.shape[1:]) == (1,)


def probe_run(config, encoder: nn.Module, init_encoder: nn.Module,
              transform: Callable[[torch.Tensor], torch.Tensor], resamples: int = 2000
              ) -> dict:
    """:func:`probe_by_patient` of a training run: its dataset's ``train`` + ``val`` splits (the
    training patients) against ``test``, the run's encoder against ``init_encoder``."""
    from ..run.data import load_split

    parts = [split_arrays(load_split(config, s)[0]) for s in ("train", "val", "test")]
    train = (torch.cat([parts[0][0], parts[1][0]]), np.concatenate([parts[0][1], parts[1][1]]),
             parts[0][2] + parts[1][2])
    names = load_split(config, "test")[2]
    was = encoder.training, init_encoder.training
    encoder.eval()
    init_encoder.eval()
    try:
        return probe_by_patient(train, parts[2], {"pretrained": encoder, "init": init_encoder},
                             transform, endpoint=f"{config.data.dataset} {names[0]}",
                             resamples=resamples, seed=config.run.seed)
    finally:
        encoder.train(was[0])
        init_encoder.train(was[1])
