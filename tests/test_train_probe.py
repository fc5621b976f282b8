"""The end-of-run probe: the trained encoder, its initialisation and the raw pixels, probed on
the same splits, and the three lines the demo ends with."""

import pytest
import torch

from spcl_fast.eval import linear_probe, multilabel_auroc
from spcl_fast.run.data import intensity_stats, load_split, materialize, normalizer
from spcl_fast.run.presets import smoke
from spcl_fast.train.__main__ import _report
from spcl_fast.train.engine import train


def test_probe_reports_raw_pixels_beside_the_encoders(tmp_path, capsys):
    config = smoke().replace(steps=2, probe=True, probe_steps=5, num_images=48)
    summary = train(config, tmp_path / "run")
    probe = summary["probe"]
    assert set(probe) == {"pretrained", "init", "raw_pixels", "pretrained_minus"}
    # the saved test scores give back each probe's AUROC and the bootstrap's difference
    saved = torch.load(tmp_path / "run" / "probe_scores.pt")
    for name in ("pretrained", "init", "raw_pixels"):
        _, mean = multilabel_auroc(saved[name], saved["labels"])
        assert mean == pytest.approx(probe[name]["mean_auroc"], abs=1e-6)
        if name != "pretrained":
            paired = probe["pretrained_minus"][name]
            assert paired["low"] <= paired["high"]
            assert paired["difference"] == pytest.approx(
                probe["pretrained"]["mean_auroc"] - probe[name]["mean_auroc"], abs=1e-6)

    # the raw-pixel row is the plain probe on the run's normalised pixels, written out here
    transform = normalizer(config.data.normalize, tuple(summary["intensity_stats"]))
    splits = {}
    for s in ("train", "val", "test"):
        source, labels, names = load_split(config, s)
        splits[s] = (transform(materialize(source, labels)[0]).flatten(1), labels)
    assert tuple(summary["intensity_stats"]) == tuple(
        intensity_stats("synthetic", load_split(config, "train")[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(config.run.threads)  # the run's threads: the same float sums
    try:
        want = linear_probe(splits["train"], splits["val"], splits["test"], steps=5,
                            class_names=names)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(probe["raw_pixels"]["mean_auroc"], want["mean_auroc"])
    assert probe["raw_pixels"]["per_class_auroc"] == want["per_class_auroc"]

    _report(summary, str(tmp_path / "run"), 0.1)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert {"pre-trained", "at", "raw", "gain"} <= set(rows)
    pre, init, raw = (probe[k]["mean_auroc"] for k in ("pretrained", "init", "raw_pixels"))
    assert f"{pre - init:+.3f} over init" in rows["gain"]
    assert f"{pre - raw:+.3f} over raw pixels" in rows["gain"]
    low = probe["pretrained_minus"]["raw_pixels"]["low"]
    assert f"over raw pixels (95% CI {low:+.3f} to" in rows["gain"]


def test_report_reads_a_summary_written_before_raw_pixels_were_probed(capsys):
    res = {"mean_auroc": 0.6, "per_class_auroc": {"a": 0.6}}
    summary = {"steps": 3, "final_loss": 1.0, "checkpoint": "ckpt", "probe": {
        "pretrained": res, "init": {**res, "mean_auroc": 0.5}}}
    _report(summary, "run", 0.1)
    out = capsys.readouterr().out
    assert "raw pixels" not in out and "+0.100 over init" in out
