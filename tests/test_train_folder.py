"""Pre-training on an unlabelled folder (a user's own archive): the run ends cleanly, its
summary written, the end-of-run probe skipped with one line (issue 38, item 1)."""

import json

import numpy as np
import pytest
from PIL import Image

from spcl_fast.train.__main__ import _report, main


def _folder(root, patients=6, per_patient=4, size=40):
    rng = np.random.default_rng(0)
    for p in range(patients):
        (root / f"patient{p}").mkdir(parents=True)
        for i in range(per_patient):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"patient{p}" / f"{i}.png")
    return root


def test_folder_training_skips_the_probe_and_writes_its_summary(tmp_path, capsys):
    root = _folder(tmp_path / "films")
    out = tmp_path / "run"
    summary = main(["--preset", "smoke", "--dataset", "folder", "--data-root", str(root),
                    "--num-images", "none", "--batch-size", "4", "--steps", "2",
                    "--num-workers", "0", "--probe", "true", "--out", str(out)])
    text = capsys.readouterr().out
    skipped = [line for line in text.splitlines() if "probe is skipped" in line]
    assert len(skipped) == 1 and "'folder' has no labels" in skipped[0]
    assert "probe_scores.pt" not in text  # the outputs line lists what was written
    assert "using 1 CPU thread(s) per process; change with --threads" in text
    assert "finished 2 steps (training " in text
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["steps"] == 2 and "probe" not in saved
    assert "no labels" in saved["probe_skipped"]
    assert not (out / "probe_scores.pt").exists()


def test_report_names_what_each_time_is(capsys):
    summary = {"steps": 3, "final_loss": 1.0, "checkpoint": "ckpt", "train_seconds": 2.2,
               "probe_seconds": 48.0}
    _report(summary, "run", 54.0)
    assert "finished 3 steps (training 2 s, probe 48 s; 54 s in all)" in capsys.readouterr().out


def test_an_impl_that_cannot_run_here_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "smoke", "--impl", "triton", "--device", "cpu", "--out", str(out)])
    message = str(exc.value.code)
    assert message.startswith("error: --impl triton") and "CUDA" in message
    assert "\n" not in message and not out.exists()
