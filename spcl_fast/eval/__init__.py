"""Downstream evaluation: linear probe, fine-tuning, segmentation, metrics, encoder loading,
and the patient-level instrument (:mod:`~spcl_fast.eval.patient`: grouped splits, probes
tuned on training patients, the cluster bootstrap, readouts, label fractions, shortcuts).

``python -m spcl_fast.eval {linear-probe,finetune,segment} --checkpoint C --dataset NAME ...``
"""

from .encoders import EncoderLoadError, LoadedEncoder, convert_timm_state, load_encoder
from .finetune import FinetuneSettings, finetune, masked_bce
from .label_fraction import DatasetView, label_fraction_view, sample_patients
from .linear_probe import extract_dataset_features, extract_features, fit_logistic, linear_probe
from .metrics import (
    auroc,
    bootstrap_mean_auroc,
    dice_per_image,
    dice_summary,
    multilabel_auroc,
    paired_bootstrap,
    roc_curve,
)
from .patient import (
    cluster_bootstrap,
    fit_probe,
    patient_folds,
    patient_split,
    readout_features,
)
from .patient_probe import format_patient_probe, probe_by_patient
from .segment import SegmentationDecoder, SegmentSettings, segment

__all__ = [
    "DatasetView",
    "EncoderLoadError",
    "FinetuneSettings",
    "LoadedEncoder",
    "SegmentSettings",
    "SegmentationDecoder",
    "auroc",
    "bootstrap_mean_auroc",
    "cluster_bootstrap",
    "convert_timm_state",
    "dice_per_image",
    "dice_summary",
    "extract_dataset_features",
    "extract_features",
    "finetune",
    "fit_logistic",
    "fit_probe",
    "format_patient_probe",
    "label_fraction_view",
    "linear_probe",
    "load_encoder",
    "masked_bce",
    "multilabel_auroc",
    "paired_bootstrap",
    "patient_folds",
    "probe_by_patient",
    "patient_split",
    "readout_features",
    "roc_curve",
    "sample_patients",
    "segment",
]
