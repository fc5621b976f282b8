"""The fold confirmation of the patient screen (studies/patient_folds.py): out-of-fold scores
pooled into one AUROC per row with paired patient-level differences, and the docs table
generated from the saved results."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from studies import patient_folds

ROOT = Path(__file__).resolve().parent.parent


def _toy(n_patients=40, films=3, n_folds=4, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], films).astype(object)
    labels = np.repeat(rng.integers(0, 2, n_patients), films).astype(np.float64)
    from spcl_fast.eval.patient import patient_folds as folds

    sources = np.where(np.arange(len(groups)) < len(groups) // 2, "a", "b").astype(object)
    return {"labels": labels, "groups": groups, "sources": sources,
            "folds": folds(groups, labels, n_folds, seed)}


def test_pooled_out_of_fold_scores_and_paired_differences():
    data = _toy()
    rng = np.random.default_rng(1)
    signal = {"raw_pixels": 0.5, "init": 0.2, "spcl": 1.0}
    done = {row: [{"scores": data["labels"][t] * w + rng.normal(size=len(t)), "seconds": 1.0}
                  for _, t in data["folds"]] for row, w in signal.items()}
    result = patient_folds.summary(done, data, {"spcl": 7}, "spcl", len(data["folds"]))
    for row, folds in done.items():
        pooled = np.empty(len(data["labels"]))
        for (_, t), f in zip(data["folds"], folds, strict=True):
            pooled[t] = f["scores"]
        assert result["auroc"][row]["value"] == pytest.approx(roc_auc_score(data["labels"],
                                                                            pooled))
        entry = result["auroc"][row]
        assert entry["low"] <= entry["value"] <= entry["high"]
    diff = result["difference"]["spcl - init"]
    assert diff["value"] == pytest.approx(result["auroc"]["spcl"]["value"]
                                          - result["auroc"]["init"]["value"])
    assert set(result["difference"]) == {"spcl - raw_pixels", "spcl - init"}
    assert result["rows"]["spcl"]["steps"] == 7 and len(result["rows"]["spcl"]["fold_auroc"]) == 4
    assert result["instrument"]["patients"] == 40
    table = patient_folds.markdown(result)
    assert "| spcl | 7 | 1 |" in table and "raw pixels" in table
    # each sample read apart: its own films and patients, the same pooled scores
    for source in "ab":
        part, films = result["by_source"][source], data["sources"] == source
        assert part["films"] == 60 and part["patients"] == 20
        for row, folds in done.items():
            pooled = np.empty(len(data["labels"]))
            for (_, t), f in zip(data["folds"], folds, strict=True):
                pooled[t] = f["scores"]
            assert part["auroc"][row]["value"] == pytest.approx(
                roc_auc_score(data["labels"][films], pooled[films]))
        assert set(part["difference"]) == set(result["difference"])
    assert "| a | spcl |" in patient_folds.markdown_by_source(result)
    # a row without every fold is left out rather than pooled from part of the films
    partial = {**done, "late": done["spcl"][:2]}
    assert "late" not in patient_folds.summary(partial, data, {}, "spcl", 4)["auroc"]


def test_the_docs_table_is_the_saved_results():
    results = ROOT / patient_folds.RESULTS
    if not results.exists():
        pytest.skip("no saved fold results")
    import json

    for path in patient_folds.DOCS:
        doc = (ROOT / path).read_text()
        assert patient_folds.doc_with_table(doc, json.loads(results.read_text())) == doc, (
            f"{path}'s folds table is stale: python -m studies.patient_folds --tables")


def test_fractions_are_pooled_per_draw_and_probed_from_kept_features(tmp_path):
    import torch

    data = _toy(n_patients=200, films=1, n_folds=4)
    rng = np.random.default_rng(2)
    data["images"] = (torch.as_tensor(data["labels"])[:, None, None, None] * 0.3
                      + torch.rand(len(data["labels"]), 1, 8, 8))
    first = [patient_folds.fold_scores("raw_pixels", 0, data, k, tmp_path, 0)
             for k in range(4)]
    assert all(f["fractions"] == {} for f in first)
    assert (tmp_path / "raw_pixels" / "fold0-features.npy").exists()
    # fractions added later: from the kept features; the full probe's scores stay
    np.save(tmp_path / "raw_pixels" / "fold0-features.npy",
            np.zeros((len(data["labels"]), 64)))  # tampered: proves the cache is what is read
    again = patient_folds.fold_scores("raw_pixels", 0, data, 0, tmp_path, 0, fractions=True)
    np.testing.assert_array_equal(again["scores"], first[0]["scores"])
    assert set(again["fractions"]) == {f"fraction/{f}/{d}" for f in (0.05, 0.1, 0.25, 0.5)
                                       for d in range(patient_folds.DRAWS)}
    assert np.ptp(again["fractions"]["fraction/0.5/0"]) < 1e-9  # zero features: one score

    done = {row: [{"scores": data["labels"][t] * w + rng.normal(size=len(t)), "seconds": 1.0,
                   "fractions": {f"fraction/{f}/{d}": data["labels"][t] * w * f
                                 + rng.normal(size=len(t))
                                 for f in (0.05, 0.1, 0.25, 0.5)
                                 for d in range(patient_folds.DRAWS)}}
                  for _, t in data["folds"]] for row, w in (("init", 0.2), ("spcl", 2.0))}
    done["raw_pixels"] = [{**f, "fractions": {}} for f in done["init"]]  # no fractions run
    result = patient_folds.summary(done, data, {"spcl": 7}, "spcl", 4)
    assert set(result["fractions"]) == {"0.05", "0.1", "0.25", "0.5"}
    half = result["fractions"]["0.5"]
    assert set(half["auroc"]) == {"init", "spcl"}  # raw pixels has no fractions
    want = []
    for d in range(patient_folds.DRAWS):
        pooled = np.empty(len(data["labels"]))
        for (_, t), f in zip(data["folds"], done["spcl"], strict=True):
            pooled[t] = f["fractions"][f"fraction/0.5/{d}"]
        want.append(roc_auc_score(data["labels"], pooled))
    assert half["auroc"]["spcl"]["value"] == pytest.approx(np.mean(want))
    assert set(half["difference"]) == {"spcl - init"}
    table = patient_folds.markdown_fractions(result)
    assert "| spcl | " in table and "| spcl minus init | " in table and "50% labelled" in table
    short = patient_folds.markdown_fractions(result, aurocs=False)
    assert "| spcl | " not in short and "| spcl minus init | " in short


def test_fraction_rows_default_to_the_saved_ones_that_run_and_refuse_unknown_rows():
    rows = ("raw_pixels", "init", "k05_intra_similar_g1", "k05_intra")
    assert patient_folds.fraction_rows(None, rows) == {"raw_pixels", "init",
                                                       "k05_intra_similar_g1"}
    assert patient_folds.fraction_rows("all", rows) == set(rows)
    assert patient_folds.fraction_rows("none", rows) == set()
    assert patient_folds.fraction_rows("init,k05_intra", rows) == {"init", "k05_intra"}
    with pytest.raises(SystemExit, match="not run: \\['mae'\\]"):
        patient_folds.fraction_rows("init,mae", rows)
