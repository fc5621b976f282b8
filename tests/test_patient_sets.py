"""The three-set summary of issue 37 (studies/patient_sets.py): which sets the default clears
raw pixels and init on, which methods sit above or below it, and the docs blocks generated
from the saved results."""

import json

import pytest

from studies import patient_sets


def _entry(value, low, high):
    return {"value": value, "low": low, "high": high}


def _results():
    ref = "default"
    good = {f"{ref} - raw_pixels": _entry(0.05, 0.01, 0.09),
            f"{ref} - init": _entry(0.04, 0.01, 0.07), f"simclr - {ref}": _entry(0.03, 0.01, 0.05)}
    tied = {f"{ref} - raw_pixels": _entry(0.01, -0.02, 0.04),
            f"{ref} - init": _entry(0.04, 0.01, 0.07), f"mae - {ref}": _entry(-0.04, -0.06, -0.02)}
    auroc = {ref: _entry(0.7, 0.65, 0.75)}
    folds = {"reference": ref, "instrument": {"folds": 5, "endpoint": "normal vs abnormal"},
             "by_source": {"a": {"patients": 10, "auroc": auroc, "difference": good},
                           "b": {"patients": 20, "auroc": auroc, "difference": tied}}}
    pediatric = {"reference": ref, "instrument": {"test_patients": 30, "endpoint": "pneumonia"},
                 "tables": {"primary/linear": {"auroc": auroc, "difference": tied}}}
    return folds, pediatric


def test_summary_counts_sets_cleared_and_names_methods_above_and_below():
    folds, pediatric = _results()
    table = patient_sets.markdown(folds, pediatric)
    assert "| NIH a, 5 folds | 10 | normal vs abnormal | 0.700 [0.650, 0.750] |" in table
    assert "| pediatric, one split | 30 | pneumonia |" in table
    assert "(intervals excluding 0): 1 of 3 (NIH a, 5 folds)" in table
    assert "Methods above it on a set: simclr (NIH a, 5 folds)." in table
    assert "Below it: mae (NIH b, 5 folds, pediatric, one split)." in table
    assert "dino" not in table  # a method measured on no set has no column
    with pytest.raises(ValueError, match="reference"):
        patient_sets.markdown(folds, {**pediatric, "reference": "other"})


def test_the_docs_blocks_are_the_saved_results():
    if not (patient_sets.FOLDS.exists() and patient_sets.PEDIATRIC.exists()):
        pytest.skip("no saved results")
    folds, pediatric = (json.loads(p.read_text())
                        for p in (patient_sets.FOLDS, patient_sets.PEDIATRIC))
    for path in patient_sets.DOCS:
        doc = path.read_text()
        assert patient_sets.doc_with_table(doc, folds, pediatric) == doc, (
            f"{path}'s sets table is stale: python -m studies.patient_sets")
