"""The patient-level instrument: grouped splits are patient-disjoint, the cluster bootstrap
equals a written-out reference (draw patients, concatenate their films, recompute the AUROC),
readouts, label fractions, the shortcut audit, and endpoints built from the real CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from spcl_fast.eval.endpoints import kermany_table, nih_endpoints
from spcl_fast.eval.patient import (
    C_GRID,
    PERMUTATIONS,
    cluster_bootstrap,
    fit_probe,
    knn_scores,
    label_fraction_draws,
    patient_folds,
    patient_resamples,
    patient_split,
    readout_features,
    resampled_aurocs,
    shortcut_targets,
)
from spcl_fast.eval.patient_probe import format_patient_probe, probe_by_patient
from spcl_fast.nn import VisionTransformer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _toy(patients=30, seed=0):
    """Films of ``patients`` patients (1 to 4 each), labels per patient, a noisy score."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, patients)
    groups = np.repeat([f"p{i}" for i in range(patients)], sizes)
    labels = np.repeat(rng.integers(0, 2, patients), sizes)
    labels[:2] = [0, 1] if labels[0] == labels[1] else labels[:2]
    score_a = labels + rng.normal(0, 1.0, len(labels))
    score_b = labels + rng.normal(0, 2.0, len(labels))
    return groups, labels, score_a, score_b


def test_patient_split_is_patient_disjoint_with_the_asked_share():
    groups, labels, _, _ = _toy(80)
    train, test = patient_split(groups, test_fraction=0.3, seed=3)
    assert not set(groups[train]) & set(groups[test])
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(groups)))
    assert len(set(groups[test])) == 24  # ceil(0.3 * 80) patients
    again = patient_split(groups, test_fraction=0.3, seed=3)
    assert np.array_equal(again[1], test)
    with pytest.raises(ValueError, match="test_fraction"):
        patient_split(groups, test_fraction=1.0)


def test_patient_folds_are_disjoint_and_cover_every_patient_once():
    groups, labels, _, _ = _toy(60)
    folds = patient_folds(groups, labels, n_folds=5, seed=1)
    seen = []
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(groups)
        seen += sorted(set(groups[test]))
    assert sorted(seen) == sorted(set(groups))


def test_cluster_bootstrap_matches_the_written_out_reference():
    groups, labels, a, b = _toy(25, seed=4)
    resamples, seed = 300, 7
    values, samples, patients = resampled_aurocs({"a": a, "b": b}, labels, groups, resamples,
                                                 seed)
    ids, draws, _ = patient_resamples(groups, resamples, seed)
    assert patients == len(ids) == 25
    ref = {"a": [], "b": []}
    for row in draws:  # the reference: concatenate the drawn patients' films, recompute
        films = np.concatenate([np.flatnonzero(groups == ids[p]) for p in row])
        y = labels[films]
        for name, s in (("a", a), ("b", b)):
            ref[name].append(roc_auc_score(y, s[films]) if 0 < y.sum() < len(y) else np.nan)
    for name in ("a", "b"):
        np.testing.assert_allclose(samples[name], ref[name], rtol=0, atol=1e-12)
    assert values["a"] == pytest.approx(roc_auc_score(labels, a))
    res = cluster_bootstrap({"a": a, "b": b}, labels, groups, pairs=[("a", "b")],
                            resamples=resamples, seed=seed)
    ok = ~np.isnan(np.array(ref["a"])) & ~np.isnan(np.array(ref["b"]))
    diff = np.array(ref["a"])[ok] - np.array(ref["b"])[ok]
    low, high = np.quantile(diff, [0.025, 0.975])
    got = res["difference"]["a - b"]
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-12)
    assert got["p_not_above"] == pytest.approx(float((diff <= 0).mean()))
    assert res["auroc"]["a"]["low"] == pytest.approx(np.quantile(np.array(ref["a"])[ok], 0.025))


def test_cluster_bootstrap_is_wider_than_an_image_bootstrap_for_clustered_films():
    """Patients with many alike films: resampling films would overstate the sample size."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 10)
    labels = np.repeat(np.arange(20) % 2, 10)
    score = np.repeat(rng.normal(0, 1, 20), 10) + 0.8 * labels
    by_patient = cluster_bootstrap({"s": score}, labels, groups, resamples=500)["auroc"]["s"]
    by_film = cluster_bootstrap({"s": score}, labels, np.arange(200), resamples=500)["auroc"]["s"]
    assert by_patient["high"] - by_patient["low"] > 2 * (by_film["high"] - by_film["low"])


def test_bad_bootstrap_inputs_are_named():
    groups, labels, a, _ = _toy(10)
    with pytest.raises(ValueError, match="patient ids"):
        cluster_bootstrap({"a": a}, labels, groups[:-1])
    with pytest.raises(ValueError, match="pair"):
        cluster_bootstrap({"a": a}, labels, groups, pairs=[("a", "z")])
    with pytest.raises(ValueError, match="resamples"):
        patient_resamples(groups, 0)


def test_probe_chooses_c_on_training_patients_and_falls_back_when_it_cannot():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 3)
    y = np.repeat(np.arange(40) % 2, 3)
    x = rng.normal(0, 1, (120, 5)) + y[:, None]
    probe = fit_probe(x, y, groups)
    assert probe.chosen_c in C_GRID
    assert roc_auc_score(y, probe.predict_proba(x)[:, 1]) > 0.9
    one_each = fit_probe(x[:6], np.array([0, 0, 0, 1, 1, 1]), ["a"] * 3 + ["b"] * 3)
    assert one_each.chosen_c == C_GRID[len(C_GRID) // 2]
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(x[:3], np.zeros(3), groups[:3])
    assert knn_scores(x, y, x[:4], k=500).shape == (4,)  # k capped at the training films


def test_readouts_mean_is_the_encoders_own_pooling_and_rich_stacks_nine_parts():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=5, num_heads=2)
    x = torch.rand(3, 1, 32, 32)
    feats = readout_features(enc, x, transform=lambda t: 2 * t, batch_size=2)
    with torch.no_grad():
        expected = enc(2 * x)
    np.testing.assert_allclose(feats["mean"], expected.numpy(), atol=1e-5)
    assert feats["rich"].shape == (3, 9 * 16)
    np.testing.assert_allclose(feats["rich"][:, :16], feats["mean"])


def test_label_fractions_sample_patients_nested_by_draw():
    groups, _, _, _ = _toy(100)
    draws = label_fraction_draws(groups, fractions=(0.05, 0.25, 1.0), draws=3)
    assert set(draws) == {(0.05, 0), (0.05, 1), (0.05, 2), (0.25, 0), (0.25, 1), (0.25, 2),
                          (1.0, 0)}
    for (fraction, _), idx in draws.items():
        chosen = set(groups[idx])
        assert len(chosen) == int(np.ceil(fraction * 100))
        assert set(np.flatnonzero(np.isin(groups, list(chosen)))) == set(idx.tolist())
    assert set(draws[(0.05, 1)]) <= set(draws[(0.25, 1)].tolist())


def test_shortcut_targets_and_the_permuted_control():
    groups, labels, _, _ = _toy(40)
    images = torch.rand(len(groups), 1, 4, 4)
    train, test = patient_split(groups, 0.3)
    ages = np.arange(len(groups)) % 90
    t = shortcut_targets(images, train, labels, groups, sexes=["M", "F"] * (len(groups) // 2)
                         + ["M"] * (len(groups) % 2), ages=ages,
                         views=["AP"] * len(groups))
    draws = [f"permuted/{d}" for d in range(PERMUTATIONS)]
    assert set(t) == {"brightness", "sex", "age", "view", *draws}
    assert t["brightness"][train].mean() == pytest.approx(0.5, abs=0.05)
    patients = np.unique(groups[train])
    truth = np.asarray([labels[np.flatnonzero(groups == p)[0]] for p in patients])
    for key in draws:
        np.testing.assert_array_equal(t[key][test], labels[test])
        null = []
        for p in patients:  # one label per training patient
            got = set(t[key][train][groups[train] == p])
            assert len(got) == 1
            null.append(got.pop())
        null = np.asarray(null)
        assert null.sum() == truth.sum()  # a permutation of the patients' labels
        # as many positives among the truly positive patients as the share says: balanced
        assert null[truth == 1].sum() == round(truth.mean() * truth.sum())
    assert len({t[key][train].tobytes() for key in draws}) == PERMUTATIONS


def test_patient_probe_reports_every_row_and_difference():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)

    def part(n, prefix):
        y = np.arange(n) % 2
        x = torch.rand(n, 1, 16, 16) + torch.as_tensor(y, dtype=torch.float32)[:, None, None,
                                                                                 None]
        return x, y, [f"{prefix}{i // 2}" for i in range(n)]
    res = probe_by_patient(part(40, "tr"), part(30, "te"), {"pretrained": enc, "init": enc},
                        transform=None, endpoint="toy", resamples=100)
    assert list(res["auroc"]) == ["pretrained", "init", "raw_pixels"]
    assert list(res["difference"]) == ["pretrained - init", "pretrained - raw_pixels"]
    assert res["test_patients"] == 15 and res["difference"]["pretrained - init"]["value"] == 0
    text = format_patient_probe(res)
    assert "raw pixels" in text and "15 other patients" in text
    with pytest.raises(ValueError, match="share patients"):
        probe_by_patient(part(10, "a"), part(10, "a"), {"pretrained": enc}, None)


def test_nih_endpoints_keep_findings_with_enough_positives():
    findings = np.zeros((100, 3), int)
    findings[:30, 0] = 1  # 30 positives: half in train, half in test
    findings[:10, 1] = 1
    ends = nih_endpoints(findings, ["a", "b", "c"], np.arange(0, 100, 2), np.arange(1, 100, 2),
                         min_positives=15)
    assert list(ends) == ["abnormal", "a"]
    assert ends["abnormal"].sum() == 30


@pytest.mark.skipif(not (SHARED / "chestxray14-785").is_dir(), reason="../shared/data absent")
def test_nih_endpoints_from_the_real_csv():
    from spcl_fast.data.chestxray14 import CLASS_NAMES

    rows = list(csv.DictReader(open(SHARED / "chestxray14-785" / "Data_Entry_2017.csv")))
    findings = np.array([[c in r["Finding Labels"].split("|") for c in CLASS_NAMES]
                         for r in rows], int)
    everyone = np.arange(len(rows))
    ends = nih_endpoints(findings, CLASS_NAMES, everyone, everyone)
    assert ends["abnormal"].sum() == sum(r["Finding Labels"] != "No Finding" for r in rows)
    assert ends["abnormal"].sum() == 785 - 475  # the README's count of No Finding
    assert ends["Pneumonia"].sum() == 310 and "Hernia" not in ends  # 3 positives


@pytest.mark.skipif(not (SHARED / "kermany-pediatric").is_dir(), reason="../shared/data absent")
def test_kermany_counts_identical_files_once():
    root = SHARED / "kermany-pediatric"
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    table = kermany_table(root)
    assert len(table["paths"]) == len({r["sha1"] for r in rows}) < len(rows) == 5840
    assert len(set(table["sha1"])) == len(table["sha1"])
    first = {}
    for r in sorted(rows, key=lambda r: r["path"]):
        first.setdefault(r["sha1"], r)
    assert sum(table["labels"]) == sum(r["label"] == "PNEUMONIA" for r in first.values())
    assert all(Path(p).is_file() for p in table["paths"][:20])
    assert {p.split(":")[0] for p in table["patient_ids"]} == {"NORMAL", "PNEUMONIA"}
