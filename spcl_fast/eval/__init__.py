"""Downstream evaluation: metrics and linear probing."""

from .linear_probe import extract_features, fit_logistic, linear_probe
from .metrics import auroc, multilabel_auroc

__all__ = ["auroc", "extract_features", "fit_logistic", "linear_probe", "multilabel_auroc"]
