"""The recipe study (``python -m studies``, ``studies/run.py``) on a tiny budget: records,
table, resume, errors."""

import json
import math

import pytest

from spcl_fast.run.presets import smoke
from studies import run as study


@pytest.fixture
def tiny(monkeypatch):
    """The study's base preset shrunk to the smoke one, probing on (32 px) synthetic images."""
    monkeypatch.setitem(study.PRESETS, "demo", lambda: smoke().replace(probe_steps=20))


def test_study_table_resume_and_plot(tiny, tmp_path, monkeypatch):
    argv = ["--out", str(tmp_path), "--sets", "synthetic", "--seeds", "0,1",
            "--recipes", "spcl,spcl_keep05,mae,simclr", "--steps", "3"]
    result = study.main(argv)

    rows = {t["row"]: t for t in result["table"]}
    assert set(rows) == {"spcl", "spcl_keep05", "mae", "simclr", "init (dataset)",
                         "raw pixels (dataset)", "raw pixels (image)"}
    for name in ("spcl", "spcl_keep05", "mae", "simclr", "init (dataset)"):
        seeds = [r["mean_auroc"] for r in result["runs"] if r["row"] == name]
        assert len(seeds) == 2 and rows[name]["seeds"] == 2
        assert rows[name]["mean_auroc"] == pytest.approx(sum(seeds) / 2)
        assert rows[name]["std"] == pytest.approx(abs(seeds[0] - seeds[1]) / math.sqrt(2))
        assert 0 <= rows[name]["mean_auroc"] <= 1
    # Both S-PCL recipes normalise the same way: one init record per seed, not per recipe.
    assert rows["spcl"]["steps"] == 3
    # The baselines' steps come from the S-PCL time budget and their own measured step times.
    for baseline in ("mae", "simclr"):
        steps = {r["steps"] for r in result["runs"] if r["row"] == baseline}
        assert len(steps) == 1 and steps.pop() >= 1
        assert (tmp_path / "synthetic" / f"timing-{baseline}" / "metrics.jsonl").exists()
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["markdown"] == result["markdown"]
    env = saved["environment"]  # where the times were taken
    assert env["torch"] and env["cpu_count"] >= 1 and env["torch_threads"] >= 1 and env["device"]
    assert "| spcl | " in result["markdown"] and "raw pixels (image)" in result["markdown"]
    assert (tmp_path / "study.png").stat().st_size > 0
    # Every row is set against raw pixels on the same test images, its seeds averaged.
    compared = {c["row"]: c for c in result["compare"]}
    assert set(compared) == set(rows) - {"raw pixels (dataset)"}
    for name, c in compared.items():
        assert c["baseline"] == "raw pixels (dataset)" and c["low"] <= c["high"]
        assert c["difference"] == pytest.approx(
            rows[name]["mean_auroc"] - rows["raw pixels (dataset)"]["mean_auroc"], abs=1e-6)
        assert f"| {name} | synthetic | raw pixels (dataset) | {c['difference']:+.3f} [" \
            in saved["compare_markdown"]

    # Rerunning reads every finished run back instead of training it again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "train", no_training)
    again = study.main(argv)
    assert again["table"] == result["table"]


def test_study_summary_statistics():
    records = [{"set": "s", "row": "a", "mean_auroc": x} for x in (0.6, 0.7, 0.8)]
    records.append({"set": "s", "row": "b", "mean_auroc": 0.5})
    table = {t["row"]: t for t in study.summarise(records)}
    assert table["a"]["mean_auroc"] == pytest.approx(0.7)
    assert table["a"]["std"] == pytest.approx(0.1)
    assert table["b"]["std"] == 0.0 and table["b"]["seeds"] == 1
    assert study.mean_std([math.nan, 0.4]) == (0.4, 0.0)
    text = study.markdown(study.summarise(records), ["s"])
    assert "| a | 0.700 ± 0.100 | — | — |" in text and "| b | 0.500 | — | — |" in text
    timed = [{"set": s, "row": "r", "mean_auroc": 0.6, "steps": 9, "train_seconds": t}
             for s, t in (("x", 10.0), ("y", 20.0))]
    assert "| r | 0.600 | 0.600 | 9 | 10, 20 |" in study.markdown(
        study.summarise(timed), ["x", "y"])


def test_ablations_expand_to_the_default_and_one_change_each():
    recipes = study.expand_recipes("ablations")
    assert recipes[0] == "spcl_keep05" and len(recipes) == 1 + len(study.ABLATIONS)
    base = study.RECIPES["spcl_keep05"][1]
    for name in recipes[1:]:
        changed = {k: v for k, v in study.RECIPES[name][1].items() if base.get(k) != v}
        # (VICReg's two terms are one change, look-alike batches and their thumbnail too)
        assert len(changed) == 1 or set(changed) in (
            {"vicreg_var", "vicreg_cov"}, {"batch_grouping", "group_grid"}), (name, changed)
    # The main recipes state keep, the intra-image weight and the batch grouping, so a new demo
    # default does not change what they measure.
    assert all({"keep", "intra_weight", "batch_grouping"} <= set(study.RECIPES[r][1])
               for r in study.DEFAULT_RECIPES)
    assert study.run_config({}, "spcl_keep05", 0, 5).spcl.intra_weight == 0
    assert study.run_config({}, "spcl_keep05", 0, 5).data.batch_grouping == "random"


@pytest.mark.parametrize("recipe", sorted(study.RECIPES))
def test_every_recipe_is_a_valid_run_of_its_method(recipe):
    from spcl_fast.run.model import build_model

    config = study.run_config({}, recipe, seed=0, steps=2)
    config.check()
    assert config.method == study.RECIPES[recipe][1].get("method", "spcl")
    build_model(config.replace(embed_dim=32, depth=1, num_heads=2))


@pytest.mark.parametrize("argv, message", [
    (["--recipes", "spcl,nope"], "unknown recipe 'nope'"),
    (["--recipes", "mae,spcl"], "must start with an S-PCL recipe"),
    (["--sets", "chestxray14"], "needs --cxr-root"),
    (["--sets", "imagenet"], "unknown set 'imagenet'"),
])
def test_study_rejects_bad_arguments(tiny, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        study.main(["--out", str(tmp_path), *argv])


def test_study_baselines_follow_each_recipes_encoder_and_input(tiny, tmp_path):
    """A recipe that changes the initial encoder (class token, position embeddings) or its
    input (normalisation) gets its own init row, and raw pixels get each normalisation used."""
    result = study.main(["--out", str(tmp_path), "--sets", "synthetic", "--seeds", "0",
                         "--recipes", "spcl_keep05,k05_equalize,k05_cls,k05_no_pos,k05_predictor,"
                         "spcl_ocl_p4", "--steps", "2"])
    rows = {t["row"] for t in result["table"]}
    assert {"init (dataset)", "init (equalize)", "init (dataset, cls token)",
            "init (dataset, none pos)", "init (dataset, patch 4, cls token)",
            "raw pixels (equalize)"} <= rows
    assert not any("predictor" in r for r in rows if r.startswith("init"))
    assert sum(r.startswith("init") for r in rows) == 5


def test_cxr_cache_is_marked_done_only_when_complete(tmp_path, monkeypatch):
    from devtools.fixtures import make_chestxray14
    from spcl_fast.data import prepare as prepare_mod

    root = make_chestxray14(tmp_path / "nih", n=12, size=32)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study._cxr_cache(root, tmp_path / "cache", 64)
    assert not (tmp_path / "cache" / "chestxray14-64" / "done").exists()
    monkeypatch.undo()
    out = study._cxr_cache(root, tmp_path / "cache", 64)
    assert (out / "done").exists() and json.loads((out / "report.json").read_text())["complete"]


@pytest.mark.parametrize("argv, message", [
    (["--sets", "synthetic,bogus"], "unknown set 'bogus'"),
    (["--sets", "chestxray14"], "needs --cxr-root"),
    (["--seeds", "a"], "--seeds takes integers"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--preset", "nope"], "unknown --preset 'nope'"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--recipe", "spcl"], "unknown option --recipe; did you mean --recipes"),
    (["--recipes", "nope"], "unknown recipe 'nope'"),
    (["--out", "{file}"], "cannot use --out"),
])
def test_study_rejects_bad_choices_before_any_run(tmp_path, argv, message):
    (tmp_path / "afile").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "afile")) for a in argv]
    out = ["--out", str(tmp_path / "study")] if "--out" not in argv else []
    with pytest.raises(SystemExit, match=f"^error: [^\\n]*{message}"):
        study.main([*out, "--sets", "synthetic", *argv])
    assert not (tmp_path / "study").exists()  # nothing trained, nothing written


def test_study_probes_sex_and_view_position_on_chestxray14(tiny, tmp_path):
    """The metadata probe: its targets are the CSV's sex and view columns, row for row, and
    every encoder row (trained, init) and raw pixels get one."""
    import csv

    from devtools.fixtures import make_chestxray14

    root = make_chestxray14(tmp_path / "nih", n=36, size=32)
    result = study.main(["--out", str(tmp_path / "s"), "--sets", "chestxray14", "--cxr-root",
                         root, "--seeds", "0", "--recipes", "spcl_keep05", "--steps", "2"])
    rows = {(t["row"], t["set"]) for t in result["metadata_table"]}
    for row in ("spcl_keep05", "init (dataset)", "raw pixels (dataset)"):
        assert {(row, "male"), (row, "PA view")} <= rows
    assert "| spcl_keep05 |" in result["metadata_markdown"]
    assert "steps" not in result["metadata_markdown"].splitlines()[0]

    config = study.run_config(study.set_overrides("chestxray14", root, tmp_path / "s" / "cache",
                                                  32),
                              "spcl_keep05", 0, 2)
    splits = study.metadata_splits(config)
    with open(f"{root}/Data_Entry_2017.csv") as f:
        want = {r["Image Index"]: (r["Patient Gender"] == "M", r["View Position"] == "PA")
                for r in csv.DictReader(f)}
    source, _, _ = study.load_split(config, "test")
    got = splits["test"][1]
    assert [tuple(bool(v) for v in row) for row in got.tolist()] == [want[i] for i in source.ids]


def test_compare_refuses_scores_of_other_test_images(tmp_path):
    import torch

    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    torch.save({"labels": labels, "pretrained": labels.clone()}, tmp_path / "a.pt")
    torch.save({"labels": labels.flip(0), "pixels": labels.flip(0)}, tmp_path / "b.pt")
    records = [{"set": "s", "row": "a", "mean_auroc": 1.0,
                "scores": {"file": str(tmp_path / "a.pt"), "key": "pretrained"}},
               {"set": "s", "row": "raw pixels (dataset)", "mean_auroc": 1.0,
                "scores": {"file": str(tmp_path / "b.pt"), "key": "pixels"}}]
    with pytest.raises(ValueError, match="not probed on the same test images"):
        study.compare(records)
    records[1]["scores"]["file"] = str(tmp_path / "a.pt")
    records[1]["scores"]["key"] = "pretrained"
    (same,) = study.compare(records, resamples=20)
    assert (same["row"], same["difference"], same["seeds"]) == ("a", 0.0, 1)


def test_compare_to_a_recipe_averages_both_rows_over_their_seeds(tmp_path):
    import torch

    from spcl_fast.eval import paired_bootstrap

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(40, 3, generator=g) > 0.5).float()
    files, records = {}, []
    for row, offset in (("a", 0.0), ("b", 1.0)):
        for seed in range(2 if row == "a" else 3):
            scores = labels + (1.0 + offset) * torch.randn(40, 3, generator=g)
            path = tmp_path / f"{row}{seed}.pt"
            torch.save({"labels": labels, "pretrained": scores}, path)
            files.setdefault(row, []).append(scores)
            records.append({"set": "s", "row": row, "seed": seed, "mean_auroc": 0.0,
                            "scores": {"file": str(path), "key": "pretrained"}})
    (got,) = study.compare(records, baselines=("b",), resamples=50)
    want = paired_bootstrap(files["a"], files["b"], labels, resamples=50)
    assert (got["row"], got["baseline"], got["seeds"], got["baseline_seeds"]) == ("a", "b", 2, 3)
    assert got["difference"] == pytest.approx(want["difference"]) and got["low"] == want["low"]
    # the CLI names its baselines
    args = study.parse_args(["--compare-to", "raw pixels (dataset),k05_intra"])
    assert args.compare_to.split(",") == ["raw pixels (dataset)", "k05_intra"]


def test_a_folder_of_other_settings_is_refused_naming_them(tmp_path):
    asked = study.run_config({}, "spcl_keep05", seed=0, steps=5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(asked.replace(steps=7, lr=5e-4).to_json())
    with pytest.raises(SystemExit, match=r"\(steps 7 \(now 5\); lr 0\.0005 \(now 0\.001\)\)"):
        study._train(asked, run)
    # The thumbnail of look-alike batches is no setting of a run that groups at random ...
    assert asked.data.batch_grouping == "random"
    assert asked.replace(group_grid=4).differences(asked) == []
    # ... but it is one of a run that groups by it.
    similar = asked.replace(batch_grouping="similar")
    assert similar.replace(group_grid=4).differences(similar) == ["group_grid 4 (now 1)"]


def test_recipe_files_resolve_their_base_and_refuse_a_loop(tmp_path):
    """A recipe is a small JSON file of overrides; ``base`` puts another recipe's first."""
    for name, spec in {"a": {"overrides": {"keep": "0.5", "lr": "1e-3"}},
                       "b": {"base": "a", "ablation": True, "overrides": {"lr": "5e-4"}}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"description": name, **spec}))
    recipes, ablations = study.load_recipes(tmp_path)
    assert recipes["b"] == ("b", {"keep": "0.5", "lr": "5e-4"}) and ablations == ("b",)
    (tmp_path / "a.json").write_text(json.dumps({"description": "a", "base": "b",
                                                 "overrides": {}}))
    with pytest.raises(ValueError, match="'a' is its own base"):
        study.load_recipes(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"description": "a", "base": "zz",
                                                 "overrides": {}}))
    with pytest.raises(ValueError, match="unknown base 'zz'"):
        study.load_recipes(tmp_path)


def test_python_m_studies_runs_from_the_checkout():
    """The study lives outside the installed package (``studies/``): ``python -m studies``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "studies", "--help"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "python -m studies" in done.stdout


def test_docs_study_tables_are_the_saved_results():
    """docs/study.md's tables are what ``python -m studies.tables`` makes from
    studies/results: a changed cell is found, and so is a table name nothing makes."""
    from studies import tables

    text = tables.DOC.read_text()
    assert tables.render(text) == (text, [])
    assert {m["name"] for m in tables.BLOCK.finditer(text)} == set(tables.TABLES)
    edited = text.replace("| k05_intra_similar_g1 | 0.", "| k05_intra_similar_g1 | 1.", 1)
    assert edited != text and tables.render(edited)[1] == ["600 steps"]
    with pytest.raises(ValueError, match="unknown table"):
        tables.render("<!-- table: nope -->\n<!-- end table -->")
