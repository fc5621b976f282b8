"""The patient-level screen's bookkeeping: its tables pair every row with the references on
the same resamples and average label-fraction draws, and docs/patient-eval.md's tables are
what studies.patient_tables makes from the saved results."""

from __future__ import annotations

import numpy as np
import pytest

from studies import patient_screen, patient_tables


def _data(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    y = np.repeat(np.arange(n_patients) % 2, 2)
    test = np.arange(len(groups))
    return rng, {"test": test, "groups": groups, "endpoints": {"abnormal": y},
                 "shortcuts": {"sex": np.arange(len(groups)) % 2}}


def test_tables_pair_rows_and_average_fraction_draws():
    rng, data = _data()
    y = data["endpoints"]["abnormal"]
    good = y + rng.normal(0, 0.5, len(y))
    rows = {
        "raw_pixels": {"primary/linear": rng.normal(0, 1, len(y))},
        "init": {"primary/linear": rng.normal(0, 1, len(y))},
        "recipe": {"primary/linear": good, "fraction/0.05/0": good,
                   "fraction/0.05/1": rng.normal(0, 1, len(y)),
                   "shortcut/sex": rng.normal(0, 1, len(y))},
    }
    out = patient_screen.tables(rows, data, reference="recipe")
    assert set(out) == {"primary/linear", "fraction/0.05", "shortcut/sex"}
    primary = out["primary/linear"]
    assert set(primary["difference"]) == {"recipe - raw_pixels", "recipe - init"}
    assert primary["difference"]["recipe - raw_pixels"]["low"] > 0
    fraction = out["fraction/0.05"]["auroc"]["recipe"]["value"]
    from spcl_fast.eval.patient import resampled_aurocs

    one = resampled_aurocs({"a": good}, y, data["groups"], 10)[0]["a"]
    assert fraction < one  # the mean of a good and a chance draw


def test_generated_tables_render_every_row_and_refuse_unknown_names():
    rng, data = _data()
    y = data["endpoints"]["abnormal"]
    rows = {name: {"primary/linear": y + rng.normal(0, s, len(y)),
                   "primary/knn": y + rng.normal(0, s, len(y))}
            for name, s in (("raw_pixels", 2.0), ("init", 2.0), ("demo", 0.5))}
    results = {"tables": patient_screen.tables(rows, data, "demo"),
               "runs": {"demo": {"steps": 180, "train_seconds": 61.0, "final_loss": 3.2}},
               "instrument": {"test_films": 80, "test_patients": 40, "train_films": 1,
                              "train_patients": 1, "resamples": 2000}}
    text = "<!-- table: primary -->\n<!-- end table -->\n<!-- table: runs -->\n" \
           "<!-- end table -->\n"
    new, changed = patient_tables.render(text, results)
    assert changed == ["primary", "runs"]
    assert "| demo |" in new and "| raw pixels |" in new and "kNN k=20 cosine" in new
    assert patient_tables.render(new, results) == (new, [])
    with pytest.raises(ValueError, match="unknown table"):
        patient_tables.render("<!-- table: nope -->\n<!-- end table -->\n", results)


@pytest.mark.skipif(not patient_tables.RESULTS.exists(), reason="no saved screen results")
def test_docs_tables_are_the_saved_screen():
    text = patient_tables.DOC.read_text()
    assert patient_tables.render(text) == (text, [])
