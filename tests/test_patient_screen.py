"""The patient-level screen's bookkeeping: its tables pair every row with the references on
the same resamples (pooled and per source) and average label-fraction draws, the pediatric
set is decoded once and split by patient, and docs/patient-eval.md's tables are what
studies.patient_tables makes from the saved results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spcl_fast.eval.patient import resampled_aurocs
from studies import patient_screen, patient_tables


def _data(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    y = np.repeat(np.arange(n_patients) % 2, 2)
    test = np.arange(len(groups))
    sources = np.where(np.arange(len(groups)) < len(groups) // 2, "a", "b")
    return rng, {"test": test, "groups": groups, "primary": y, "endpoints": {},
                 "shortcuts": {"sex": np.arange(len(groups)) % 2, "permuted/0": y,
                               "permuted/1": 1 - y}, "sources": sources}


def test_tables_pair_rows_and_average_draws():
    rng, data = _data()
    y = data["primary"]
    good = y + rng.normal(0, 0.5, len(y))
    rows = {
        "raw_pixels": {"primary/linear": rng.normal(0, 1, len(y))},
        "init": {"primary/linear": rng.normal(0, 1, len(y))},
        "recipe": {"primary/linear": good, "fraction/0.05/0": good,
                   "fraction/0.05/1": rng.normal(0, 1, len(y)),
                   "shortcut/sex": rng.normal(0, 1, len(y)),
                   "shortcut/permuted/0": good, "shortcut/permuted/1": good},
    }
    out = patient_screen.tables(rows, data, reference="recipe")
    assert set(out) == {"primary/linear", "fraction/0.05", "shortcut/sex", "shortcut/permuted"}
    # each draw is scored against its own target: here one reads it well, one inverted
    permuted = out["shortcut/permuted"]["auroc"]["recipe"]["value"]
    assert permuted == pytest.approx(0.5, abs=1e-9)
    low, high = sorted(out["shortcut/permuted"]["draws"]["recipe"])
    assert low == pytest.approx(1 - high) and high > 0.7  # the draws' spread is kept
    assert "draws" not in out["shortcut/sex"]  # one draw: nothing to spread
    shown = patient_tables.render("<!-- table: toy/shortcuts -->\n<!-- end table -->\n",
                                  {"toy": {"tables": out, "runs": {}}})[0]
    assert f"(draws {low:.2f} to {high:.2f})" in shown
    primary = out["primary/linear"]
    assert set(primary["difference"]) == {"recipe - raw_pixels", "recipe - init"}
    assert primary["difference"]["recipe - raw_pixels"]["low"] > 0
    fraction = out["fraction/0.05"]["auroc"]["recipe"]["value"]
    one = resampled_aurocs({"a": good}, y, data["groups"], 10)[0]["a"]
    assert fraction < one  # the mean of a good and a chance draw


def test_by_source_scores_each_source_on_its_own_patients():
    rng, data = _data(n_patients=80)
    y = data["primary"]
    # good on source a's films only, noise on b's
    half = data["sources"] == "a"
    mixed = np.where(half, y + rng.normal(0, 0.3, len(y)), rng.normal(0, 1, len(y)))
    rows = {"raw_pixels": {"primary/linear": rng.normal(0, 1, len(y))},
            "init": {"primary/linear": rng.normal(0, 1, len(y))},
            "recipe": {"primary/linear": mixed, "shortcut/sex": mixed}}
    out = patient_screen.by_source(rows, data, "recipe")
    assert set(out) == {"a", "b"}
    assert out["a"]["test_patients"] == 40 and out["a"]["test_films"] == 80
    assert set(out["a"]["tables"]) == {"primary/linear"}  # primary keys only
    a, b = (out[s]["tables"]["primary/linear"] for s in "ab")
    want = resampled_aurocs({"r": mixed[half]}, y[half], data["groups"][half], 10)[0]["r"]
    assert a["auroc"]["recipe"]["value"] == pytest.approx(want)
    assert a["difference"]["recipe - init"]["low"] > 0
    assert b["difference"]["recipe - init"]["low"] < 0 < b["difference"]["recipe - init"]["high"]
    assert patient_screen.by_source(rows, {**data, "sources": None}, "recipe") == {}
    # any column of strata: here the same halves named as view positions
    views = patient_screen.by_source(rows, {**data, "views": np.where(half, "AP", "PA")},
                                     "recipe", "views")
    assert views["AP"]["tables"] == out["a"]["tables"]
    assert patient_screen.by_source(rows, data, "recipe", "views") == {}


def _results(rng, data, extra=()):
    y = data["primary"]
    rows = {name: {"primary/linear": y + rng.normal(0, s, len(y)),
                   "primary/knn": y + rng.normal(0, s, len(y))}
            for name, s in (("raw_pixels", 2.0), ("init", 2.0), ("demo", 0.3),
                            *((name, 1.0) for name in extra))}
    return {"tables": patient_screen.tables(rows, data, "demo"),
            "by_source": patient_screen.by_source(rows, data, "demo"), "by_view": {},
            "reference": "demo",
            "runs": {"demo": {"steps": 180, "seconds_per_step": 1.0, "train_seconds": 61.0,
                              "final_loss": 3.2}},
            "instrument": {"set": "toy", "test_films": 80, "test_patients": 40,
                           "train_films": 1, "train_patients": 1, "resamples": 2000}}


def test_generated_tables_render_every_row_and_refuse_unknown_names():
    rng, data = _data()
    results = {"toy": _results(rng, data)}
    text = "".join(f"<!-- table: toy/{t} -->\n<!-- end table -->\n"
                   for t in ("primary", "runs", "by-source", "leads"))
    new, changed = patient_tables.render(text, results)
    assert changed == ["toy/primary", "toy/runs", "toy/by-source", "toy/leads"]
    views = "<!-- table: toy/by-view -->\n<!-- end table -->\n"
    assert "(no view strata in this set)" in patient_tables.render(views, results)[0]
    del results["toy"]["by_view"]  # a screen saved before views were read
    assert patient_tables.NOT_MEASURED in patient_tables.render(views, results)[0]
    assert "| demo |" in new and "| raw pixels |" in new and "kNN k=20 cosine" in new
    assert "a, linear, mean tokens" in new and "b: 40 test films of 20 patients" in new
    assert "against raw pixels, linear, mean tokens (1 compared): above: demo +" in new
    assert patient_tables.render(new, results) == (new, [])
    with pytest.raises(ValueError, match="unknown table"):
        patient_tables.render("<!-- table: toy/nope -->\n<!-- end table -->\n", results)
    with pytest.raises(ValueError, match="no results file"):
        patient_tables.render("<!-- table: no-such-screen/runs -->\n<!-- end table -->\n")


def test_seed_tables_gather_every_seed_and_average_rows_run_more_than_once():
    rng, data = _data()
    by_seed = {seed: _results(rng, data, ["other"]) for seed in (0, 1)}
    del by_seed[1]["runs"]["demo"]  # a row's name comes from either file
    text = ("<!-- table: toy/seeds -->\n<!-- end table -->\n"
            "<!-- table: toy/seeds-minus-reference -->\n<!-- end table -->\n")
    new, changed = patient_tables.render(text, {"toy": by_seed})
    assert changed == ["toy/seeds", "toy/seeds-minus-reference"]
    values = [by_seed[s]["tables"]["primary/linear"]["auroc"]["demo"]["value"] for s in (0, 1)]
    mean = f"{sum(values) / 2:.3f} ± "
    seeds_table = new.split("<!-- table: toy/seeds-minus-reference -->")[0]
    assert "| training seconds (mean) | seed 0 | seed 1 | mean ± std (seeds) |" in seeds_table
    # the seconds of the one seed whose runs have the row
    assert any(line.startswith("| demo | 61 |") and mean in line and line.endswith("(2) |")
               for line in seeds_table.splitlines())
    minus = new.split("<!-- table: toy/seeds-minus-reference -->")[1]
    assert "| demo |" not in minus and "| other |" in minus  # differences vs the reference


def _toy_kermany(root, n_patients=10):
    from PIL import Image

    lines = ["path,patient,label,detail,sha1"]
    for i in range(n_patients):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        for j in range(2):
            path = f"train/{label}/p{i}_{j}.jpeg"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((96, 96), 20 * i + j, np.uint8)).convert("RGB").save(
                root / path)
            lines.append(f"{path},p{i},{label},x,{i}-{j}")
    copy = root / "test/NORMAL/copy.jpeg"  # byte-identical to p0_0: counted once
    copy.parent.mkdir(parents=True)
    copy.write_bytes((root / "train/NORMAL/p0_0.jpeg").read_bytes())
    lines.append("test/NORMAL/copy.jpeg,p0,NORMAL,x,0-0")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_kermany_set_is_decoded_once_split_by_patient_and_pretrains_on_training_patients(
        tmp_path):
    root, out = tmp_path / "kermany", tmp_path / "out"
    _toy_kermany(root)
    data = patient_screen.instrument_data("kermany", out, root)
    assert data["images"].shape == (20, 1, 64, 64) and data["images"].dtype == torch.float32
    g = data["groups"]
    assert not set(g[data["train"]]) & set(g[data["test"]])
    assert len(set(g[data["test"]])) == 3  # 30 % of 10 patients
    assert [int(p.startswith("PNEUMONIA:")) for p in g] == data["primary"].tolist()
    assert set(data["shortcuts"]) == {"brightness"} | {f"permuted/{d}" for d in range(5)}
    assert data["sources"] is None
    folder = out / "kermany-pretrain"
    written = {p.parent.name for p in folder.glob("*/*.png")}
    assert written == {str(p).replace(":", "_") for p in g[data["train"]]}
    assert data["set"] == {"dataset": "folder", "data_root": str(folder)}
    (root / "manifest.csv").unlink()  # read back from the cache, not decoded again
    again = patient_screen.instrument_data("kermany", out, root)
    assert torch.equal(again["images"], data["images"])


@pytest.mark.skipif(not (patient_screen.KERMANY_ROOT / "manifest.csv").exists(),
                    reason="no ../shared/data/kermany-pediatric")
def test_kermany_split_of_the_real_set_is_patient_disjoint():
    from spcl_fast.data.nih_demo import FRACTIONS
    from spcl_fast.data.splits import assign_groups
    from spcl_fast.eval.endpoints import kermany_table

    pids = kermany_table(patient_screen.KERMANY_ROOT)["patient_ids"]
    role = assign_groups(pids, FRACTIONS)
    test = {p for p, r in zip(pids, role, strict=True) if r == "test"}
    assert not test & {p for p, r in zip(pids, role, strict=True) if r != "test"}
    assert len(test) >= 0.25 * len(set(pids))


def test_unknown_set_is_refused():
    with pytest.raises(ValueError, match="unknown set"):
        patient_screen.instrument_data("nope")


@pytest.mark.skipif(not list(patient_tables.RESULTS.glob("patient-screen-*.json")),
                    reason="no saved screen results")
def test_docs_tables_are_the_saved_screen():
    text = patient_tables.DOC.read_text()
    assert patient_tables.render(text) == (text, [])


def test_fraction_curves_draw_every_set(tmp_path):
    rng, data = _data()
    y = data["primary"]
    rows = {name: {"primary/linear": y + rng.normal(0, 1, len(y)),
                   "fraction/0.1/0": y + rng.normal(0, 2, len(y))}
            for name in ("raw_pixels", "init", "demo")}
    res = {"tables": patient_screen.tables(rows, data, "demo"), "reference": "demo",
           "instrument": {"set": "toy", "test_patients": 40}}
    folds = {"fractions": {"0.1": res["tables"]["fraction/0.1"]},
             "auroc": res["tables"]["primary/linear"]["auroc"],
             "difference": res["tables"]["primary/linear"]["difference"], "reference": "demo",
             "instrument": {"set": "toy", "folds": 5, "endpoint": "x", "patients": 40}}
    as_screen = patient_tables.folds_as_screen(folds)
    assert as_screen["tables"]["fraction/0.1"] == res["tables"]["fraction/0.1"]
    assert as_screen["instrument"]["set"] == "toy, 5 folds"
    path = patient_tables.fraction_curves({"a": as_screen, "b": res}, tmp_path / "f.png")
    from PIL import Image

    assert Image.open(path).size[0] > Image.open(path).size[1]  # two panels side by side
